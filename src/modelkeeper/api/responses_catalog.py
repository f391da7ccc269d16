"""Response bodies about the models the service knows: a scan of the model roots, an install,
the model listing, components, user metadata and a model's detail (its tiers, performance,
history and parts), on one host or across a cluster."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import MISSING, Field

from modelkeeper.api.responses import FixedShape, JobDone, Open
from modelkeeper.api.responses_placements import PlacementInfo
from modelkeeper.registry.records import HistoryEntry, ModelRecord, ModelSummary, UserMeta

# ---------------------------------------------------------------------- discovery


class ScanSummary(FixedShape):
    added: int
    updated: int
    unchanged: int
    moved: int
    rejected: int
    missing: int
    total: int


class RejectedFile(FixedShape):
    path: str
    status: str
    format: str | None
    type: str | None
    base: str | None
    variant: str | None
    encoder: str | None
    components: list[str]
    rule: str | None
    confidence: float | None
    model_id: str | None
    change: str
    error_code: str | None
    error: str | None


class Hashed(FixedShape):
    files: int
    bytes: int
    errors: int


class ScanResult(FixedShape):
    summary: ScanSummary
    seconds: float
    rejected: list[RejectedFile] = Field(description="The first 200 files refused.")
    missing: list[str] = Field(description="The first 200 paths gone since the last scan.")
    hashed: Hashed | MISSING = MISSING


class ScanDone(JobDone[ScanResult]):
    pass


# ---------------------------------------------------------------------- installs


class InstalledFileInfo(FixedShape):
    path: str = Field(description="Relative to the installed model's path.")
    bytes: int
    sha256: str
    reused: bool = Field(description="True: linked from content already registered, not downloaded.")


class InstallResultInfo(FixedShape):
    """An installed and registered model."""

    model_id: str
    name: str
    type: str
    source: str = Field(description="The source, without credentials.")
    kind: Literal["hub", "url", "civitai"]
    revision: str | None = Field(description="The Hub commit or the CivitAI version id.")
    path: str
    bytes: int
    transferred_bytes: int = Field(description="Bytes fetched by this install (less when resumed or reused).")
    seconds: float
    files: list[InstalledFileInfo]
    node: str | MISSING = Field(MISSING, description="The node it was installed onto (cluster mode).")


class InstallDone(JobDone[InstallResultInfo]):
    pass


# ---------------------------------------------------------------------- the registry


class NodeLocation(FixedShape):
    model_id: str = Field(description="The model's id in that node's registry.")
    path: str | None
    ram_bytes: int = Field(description="Bytes of it in that node's RAM cache.")


class ListedModel(ModelSummary):
    loaded_on: list[str] = Field(description="Devices the model is loaded on.")
    nodes: dict[str, NodeLocation] | MISSING = Field(
        MISSING, description="Cluster mode: where it lies on each node."
    )


class ModelPage(FixedShape):
    total: int
    offset: int
    limit: int
    items: list[ListedModel]


class ComponentUse(FixedShape):
    model_id: str
    name: str
    component: str


class ComponentEntry(FixedShape):
    """A component across every model holding it (one entry per content id once hashed)."""

    component_id: str | None
    kind: str
    base: str
    bytes: int
    tensor_count: int
    parameters: int
    dtypes: dict[str, int]
    models: list[ComponentUse]
    cached: bool
    nodes: list[str] | MISSING = Field(
        MISSING, description="The nodes whose registries hold it (cluster mode)."
    )


class _ModelName(FixedShape):
    model_id: str
    name: str


class ModelMetadata(UserMeta, _ModelName):  # model_id and name come first, as the service writes them
    pass


class IdentificationSummary(FixedShape):
    """What a model detail keeps of the identification (its components and file metadata are elsewhere)."""

    rule: str
    rules: dict[str, str]
    confidence: float
    loadable: bool
    hints: list[str]
    hint_conflicts: list[str]
    evidence: Open


class DiskTier(FixedShape):
    status: str
    path: str | None
    bytes: int


class RamTier(FixedShape):
    component_id: str
    bytes: int


class LoadFailure(FixedShape):
    device: str
    error_code: str
    error: str
    at: float


class Tiers(FixedShape):
    disk: DiskTier
    ram: list[RamTier]
    vram: list[PlacementInfo]
    failed: list[LoadFailure] = Field(description="The last failed load per device, until the next attempt.")


class Performance(FixedShape):
    loads: int
    last_load_seconds: float | None
    best_load_seconds: float | None
    last_validate: Open | None
    last_benchmark: Open | None
    last_optimize: Open | None


class PartInfo(FixedShape):
    """One part a transformer-only Flux or SD3 model is loaded with (``orchestrator/completion.py``)."""

    role: str = Field(
        description="Its slot in the pipeline: text_encoder, text_encoder_2, text_encoder_3, vae."
    )
    wants: str = Field(
        description="What fits the role, e.g. 'T5-XXL, 4096 wide' or 'VAE, 16 latent channels'."
    )
    status: Literal["auto", "pinned", "missing", "refused"] = Field(
        description="auto: chosen by base and shapes; pinned: the one in default_settings.parts; missing: "
        "none fits (a load answers 422 MISSING_PART); refused: the pinned one does not fit (422 INCOMPATIBLE_PART)."
    )
    model_id: str | None = Field(
        description="The part's model (None when missing or refused): a standalone text encoder or VAE, or "
        "the pipeline folder or full checkpoint whose `component` it is."
    )
    handle: str | None
    component: str | None = Field(
        description="The component of that folder or checkpoint (text_encoder_2...); None for a standalone "
        "model. `handle:component` pins it in default_settings.parts."
    )
    why: str = Field(description="Why this part, or why none.")


class ModelDetail(ModelRecord):
    identification: IdentificationSummary  # type: ignore[assignment]  # a summary in place of the full record
    state: Tiers
    performance: Performance
    history: list[HistoryEntry]
    parts: list[PartInfo] = Field(
        description="The text encoders and VAE a transformer-only Flux or SD3 file is loaded with, and "
        "what is missing (empty for other models)."
    )


class ClusterTiers(FixedShape):
    disk: list[dict[str, Any]] = Field(description="Nodes holding its file: node, path.")
    ram: list[dict[str, Any]] = Field(description="Nodes holding it in their RAM cache: node, bytes.")
    vram: list[PlacementInfo]


class ClusterModelDetail(FixedShape):
    """A model across the cluster (cluster mode): its key, where it lies on each node, its placements."""

    id: str = Field(description="The cluster key (content hash).")
    handle: str
    name: str
    type: str | None
    base: str | None
    variant: str | None
    format: str | None
    size: int | None
    path: str | None
    tags: list[str] | None
    status: str
    nodes: dict[str, NodeLocation]
    state: ClusterTiers
