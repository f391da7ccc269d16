"""Response bodies of the RAM cache (``/api/model/cache``): its stats and segments, on one host or
per node, and what caching, dropping and clearing answer."""

from __future__ import annotations

from pydantic import MISSING, Field

from modelkeeper.api.responses import FixedShape, JobInfo


class CacheStats(FixedShape):
    segments: int
    bytes_used: int
    budget_bytes: int
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    evicted_bytes: int
    shm_dir: str


class SegmentInfo(FixedShape):
    """One cached component."""

    component_id: str
    path: str
    bytes: int
    source: str
    tensor_count: int | None
    fill_seconds: float
    created_at: float
    last_used: float
    hits: int
    models: list[str]
    pinned: bool = Field(description="A worker is loading from it now.")
    node: str | MISSING = Field(
        MISSING, description="The node whose RAM cache holds it (cluster mode; ids are node/component)."
    )


class _ComponentLabel(FixedShape):
    component: str | MISSING = Field(MISSING, description="The model's component (caching a model).")


class CachedSegment(SegmentInfo, _ComponentLabel):  # the label comes first, as the service writes it
    pass


class NodeCache(FixedShape):
    """One node's RAM cache (cluster mode)."""

    stats: CacheStats
    segments: list[SegmentInfo]


class CacheView(FixedShape):
    stats: CacheStats
    segments: list[SegmentInfo]
    nodes: dict[str, NodeCache] | MISSING = Field(MISSING, description="Each node's cache (cluster mode).")


class CacheFilled(FixedShape):
    model_id: str | MISSING = MISSING
    segments: list[CachedSegment]


class CacheAnswer(FixedShape):
    """200 of ``POST /api/model/cache``: a component already cached answers at once, with no job."""

    job: JobInfo | MISSING = MISSING
    result: CacheFilled


class CacheCleared(FixedShape):
    dropped: int
    freed_bytes: int


class SegmentDropped(FixedShape):
    component_id: str
    freed_bytes: int
