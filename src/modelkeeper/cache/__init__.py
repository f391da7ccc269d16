"""The RAM cache: model components in POSIX shared memory, mapped by workers with no copy."""

from modelkeeper.cache.errors import (
    AmbiguousSegment,
    CacheError,
    CacheFull,
    SegmentInUse,
    SegmentNotFound,
    SourceChanged,
)
from modelkeeper.cache.prefix import MIN_PREFIX, resolve_segment
from modelkeeper.cache.segment import SHM_DIR, create_segment, remove_stale, segment_path
from modelkeeper.cache.store import RamCache, Segment, file_component_id

__all__ = [
    "MIN_PREFIX",
    "SHM_DIR",
    "AmbiguousSegment",
    "CacheError",
    "CacheFull",
    "RamCache",
    "Segment",
    "SegmentInUse",
    "SegmentNotFound",
    "SourceChanged",
    "create_segment",
    "file_component_id",
    "remove_stale",
    "resolve_segment",
    "segment_path",
]
