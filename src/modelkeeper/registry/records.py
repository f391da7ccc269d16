"""Records the registry returns: models with their files, components and user metadata."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelkeeper.discovery.records import ComponentInfo, Identification


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileStatus(StrEnum):
    OK = "ok"
    REJECTED = "rejected"
    MISSING = "missing"


class Hashes(_Record):
    blake3: str | None = None
    sha256: str | None = None
    autov2: str | None = Field(
        None, description="First 10 hex digits of SHA-256, as A1111 / civitai show it."
    )


class FileRecord(_Record):
    id: int
    path: str
    root: str
    rel: str
    kind: str
    format: str
    status: FileStatus
    error_code: str | None = None
    error: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    model_id: str | None = None
    hashes: Hashes = Field(default_factory=Hashes)
    first_seen: float
    last_seen: float


#: The user metadata keys ``set_meta`` accepts, and their shape.
META_KEYS: dict[str, str] = {
    "name": "text",
    "description": "text",
    "tags": "list",
    "trigger_words": "list",
    "source_url": "text",
    "license": "text",
    "default_settings": "object",
}


class UserMeta(_Record):
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    trigger_words: list[str] = Field(default_factory=list)
    source_url: str | None = None
    license: str | None = None
    default_settings: dict[str, Any] = Field(default_factory=dict)
    found: dict[str, Any] = Field(
        default_factory=dict,
        description="What sidecar files say (not edited by users); the file's own metadata is in the identification.",
    )


class ModelSummary(_Record):
    """One row of a listing."""

    id: str
    handle: str = Field(description="The short unique name to type for this model (see registry/handles.py).")
    name: str
    type: str
    base: str
    variant: str
    format: str
    status: str
    size: int
    path: str | None = Field(description="Its first present location (under the roots asked for, if any).")
    locations: int = Field(1, description="How many paths hold this content (copies, links, several roots).")
    tags: list[str] = Field(default_factory=list)


class ModelRecord(_Record):
    """Everything the registry knows about one model."""

    id: str
    handle: str
    name: str
    name_source: str
    type: str
    base: str
    variant: str
    format: str
    layout: str
    encoder: str | None
    lora_format: str | None
    lora_rank: int | None
    rule: str
    confidence: float
    status: str
    size: int
    created_at: float
    updated_at: float
    file: FileRecord | None = Field(
        description="The location to load: present first, under the roots asked for."
    )
    locations: list[FileRecord] = Field(
        default_factory=list,
        description="Every path of this content (copies, links, several roots), the file first.",
    )
    components: list[ComponentInfo]
    meta: UserMeta
    identification: Identification

    @property
    def path(self) -> str | None:
        return self.file.path if self.file else None


class SearchPage(_Record):
    total: int
    offset: int
    limit: int
    items: list[ModelSummary]


class HistoryEntry(_Record):
    id: int
    model_id: str | None
    path: str | None
    at: float
    op: str
    data: dict[str, Any]
