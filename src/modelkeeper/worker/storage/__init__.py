"""Weights kept on the device in a packed form and decoded layer by layer as the model runs.

Three packed forms, one mechanism:

- ``float8`` (e4m3fn, e5m2): the tensors of an fp8 file as they are, or weights cast down on
  request (``storage_dtype``); decoded by an upcast to the compute dtype.
- ``scaled float8`` (ComfyUI's ``scaled_fp8`` files): fp8 weights with a per-layer
  ``scale_weight``; decoded by an upcast and a multiplication.
- ``gguf`` (Q8_0, Q6_K, Q4_K, Q4_0, ...): the file's blocks as bytes; decoded on a GPU by
  :mod:`.dequant` (diffusers' GGUF functions on the CPU and for the rarer types).

Only the layers diffusers' layerwise casting would hook (Linear, Conv, Embedding:
``_GO_LC_SUPPORTED_PYTORCH_LAYERS``) keep a packed form; every other tensor (norm weights, embeddings
kept as parameters, buffers) is decoded once at load.

The modules, one job each (a module imports only those above it):

- :mod:`.dequant`: GGUF blocks decoded into the compute dtype without stopping the host;
- :mod:`.forms`: the packed forms and their decoding (:class:`Packed`), ComfyUI's scales;
- :mod:`.plan`: at load, which tensors stay packed and the compute dtype (:func:`plan_storage`);
- :mod:`.cast`: a storage cast applied while the file is read (:func:`cast_while_reading`);
- :mod:`.hooks`: the decode hooks on packed layers, adjustments (LoRAs), and what a loaded module
  holds (:func:`plan_of`, :func:`stored_forms`).
"""

from modelkeeper.worker.storage.cast import cast_sources, cast_while_reading
from modelkeeper.worker.storage.forms import FLOAT8, Packed, ScaledFloat8, is_scale_key, split_scales
from modelkeeper.worker.storage.hooks import (
    Adjust,
    attach,
    compute_dtype,
    detach,
    is_packed,
    logical_shapes,
    move_scales,
    parameter_count,
    plan_of,
    set_adjust,
    stored_forms,
)
from modelkeeper.worker.storage.plan import (
    SKIP_PATTERNS,
    StoragePlan,
    estimate_bytes,
    hook_site,
    needs_plan,
    plan_storage,
)

__all__ = [
    "FLOAT8",
    "SKIP_PATTERNS",
    "Adjust",
    "Packed",
    "ScaledFloat8",
    "StoragePlan",
    "attach",
    "cast_sources",
    "cast_while_reading",
    "compute_dtype",
    "detach",
    "estimate_bytes",
    "hook_site",
    "is_packed",
    "is_scale_key",
    "logical_shapes",
    "move_scales",
    "needs_plan",
    "parameter_count",
    "plan_of",
    "plan_storage",
    "set_adjust",
    "split_scales",
    "stored_forms",
]
