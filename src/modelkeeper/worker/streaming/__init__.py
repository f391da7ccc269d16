"""Partial residency: keep as many blocks of a module on the device as a budget allows, stream the rest.

A module is cut into *units* (UNet resnets and transformer blocks, Flux/SD3 transformer blocks,
text-encoder layers; a generic fallback groups leaf modules), chosen per architecture in
:data:`UNIT_RULES`. Resident units get their weights copied to the device once. Streamed units keep
their weights in host memory (the page-locked RAM-cache segment, or a pinned copy when the load
came from disk) and are copied into a device *ring* just ahead of their use, by forward hooks on
each unit and on the module's pass; a pass's end points every parameter back at its host copy
(the state at rest, which LoRAs patch). What the ring holds stays valid while its host copies are
unchanged (same address, same version counter). Once a pass has recorded the order of its units,
each unit has a fixed place in the ring in each pass of a short cycle (one to three passes laid out
in laps from the ring's start), so every cycle places its units where the last one did and finds
their parameter views made, whatever the ring's size (no host allocation per step once it settles);
every place is ALIGN-aligned, so each weight keeps the address alignment of the resident load.

Each unit is copied as a few contiguous runs of host memory (tensors of one block sit together in a
safetensors file), so a copy is one or two large DMA transfers, not one per tensor. Outputs are
bit-identical to the resident module: the same kernels read the same bytes, only from elsewhere.
Packed weights (fp8, scaled fp8, GGUF blocks: :mod:`modelkeeper.worker.storage`) stream packed:
the ring receives the stored bytes (half or a quarter of the decoded ones over the link), and the
layer's decode hook, which runs after the unit's pre-hook, decodes them on the device as it does
for a resident packed layer.
On a CPU worker the "device" is the CPU: streamed weights live in their own host buffers and are
copied into the ring before use (synchronously), which exercises the same mechanics.

The modules, one job each (a module imports only those above it):

- :mod:`.units`: the units of a module, their weights, and the plan of their copies (``plan_copy``);
- :mod:`.plan`: pure functions of sizes: the resident limit, the resident units, the ring's size,
  the places of a pass's units in the ring (the laps of a cycle of passes);
- :mod:`.host`: which host memory is page-locked already (the RAM-cache segments);
- :mod:`.ring`: the device ring: each unit's place, first fit, fences, parameter views;
- :mod:`.streamer`: :class:`Streamer`, which places a module and streams it through its hooks.

The knobs read at run time live in their modules (set them there, not here):
``units.GROUP_BYTES`` and ``streamer.POOL_TARGET``.
"""

from modelkeeper.worker.streaming.host import registered_host
from modelkeeper.worker.streaming.plan import (
    choose_resident,
    lay_out,
    lay_out_cycle,
    pool_limit,
    pool_size,
    resident_limit,
    ring_pays,
)
from modelkeeper.worker.streaming.ring import VIEW_CACHE, StreamStats
from modelkeeper.worker.streaming.streamer import Streamer
from modelkeeper.worker.streaming.units import (
    ALIGN,
    MERGE_GAP,
    PASS_ROOTS,
    UNIT_RULES,
    Unit,
    Weight,
    find_units,
    plan_copy,
)

__all__ = [
    "ALIGN",
    "MERGE_GAP",
    "PASS_ROOTS",
    "UNIT_RULES",
    "VIEW_CACHE",
    "StreamStats",
    "Streamer",
    "Unit",
    "Weight",
    "choose_resident",
    "find_units",
    "lay_out",
    "lay_out_cycle",
    "plan_copy",
    "pool_limit",
    "pool_size",
    "registered_host",
    "resident_limit",
    "ring_pays",
]
