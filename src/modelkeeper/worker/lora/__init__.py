"""LoRAs patched into live modules: fused (no cost per forward pass), exact and reversible.

For every weight ``W`` a LoRA touches, the original ``W0`` is kept in a backup when it is first
patched (on the device, or in pinned host memory when the device is short), and the weight is
always re-derived from it::

    W = W0 + sum_i strength_i * scale_i * delta_i      (i: the LoRAs on W, in load order)

so changing a strength rewrites only the touched weights from ``W0`` (no file read, no reload of
the base model), and removing the last LoRA of a weight copies ``W0`` back: bitwise the original.
A weight kept packed (fp8, scaled fp8, GGUF: :mod:`modelkeeper.worker.storage`) is never written:
its delta is added to the decoded weight each time its layer runs, so removal is exact by construction.
Each LoRA's factors are prepared once, on the device and in the weight's dtype, when it is loaded:
``up @ down`` for LoRA / LoCon (and LoHa, whose Hadamard product is rewritten as one low-rank
product of rank r1*r2 when that is smaller than the weight), the two Kronecker factors for LoKr.

Formats (key names: :mod:`~modelkeeper.worker.lora.parse`): kohya / sd-scripts
(``lora_unet_*``, ``lora_te[12]_*``: ``lora_down``/``lora_up``/``alpha``, conv LoCon), LyCORIS LoHa
(``hada_w*``) and LoKr (``lokr_w*``), full diffs (``diff``), PEFT / diffusers (``unet.*.lora_A``, the
scale from the file's ``lora_adapter_metadata``) and old diffusers (``to_q_lora.down``), on SD1/SD2,
SDXL (sd-scripts' SGM names) and Flux (sd-scripts / BFL names) models and their text encoders.
Refused with a clear error and nothing changed: DoRA, Tucker-decomposed LyCORIS, a LoRA whose
layers do not fit (another base) or whose keys match nothing.

Proposed protocol (the handlers resolve model names to modules and call the manager):

- ``model.load_lora`` data ``{name, path, targets: {<role, one of ROLES>: <loaded model name>},
  strength: 1.0, role_strength?: {role: float}, strict: false,
  min_match: 0.5}``; result :meth:`LoraReport.as_dict` ``{name, source, format, strength,
  role_strength, roles: {role: {layers, keys}}, matched_keys, unmatched_keys, unmatched,
  skipped_roles, params_patched, factor_bytes, backup_bytes, backup_place, read_seconds,
  prepare_seconds, apply_seconds, seconds}``.
- ``model.set_lora_strength`` data ``{name, strength, role_strength?}``; result
  ``{name, strength, previous, role_strength, params_patched, seconds}``.
- ``model.unload_lora`` data ``{name}``; result ``{name, params_restored, params_rederived,
  freed_bytes, seconds}``. ``model.get_model_info`` may list :meth:`LoraManager.loaded`.

Modules: :mod:`~modelkeeper.worker.lora.parse` reads a LoRA file into layers,
:mod:`~modelkeeper.worker.lora.matching` resolves them to a target module's weights,
:mod:`~modelkeeper.worker.lora.delta` prepares their deltas and
:mod:`~modelkeeper.worker.lora.manager` patches, re-strengthens and removes them.
"""

from modelkeeper.worker.lora.delta import Delta
from modelkeeper.worker.lora.manager import BackupPlace, LoraManager, LoraReport
from modelkeeper.worker.lora.matching import LoraIncompatible, Match, resolve
from modelkeeper.worker.lora.parse import ROLES, Factors, Layer, parse_lora, read_lora_file

__all__ = [
    "ROLES", "BackupPlace", "Delta", "Factors", "Layer", "LoraIncompatible", "LoraManager", "LoraReport",
    "Match", "parse_lora", "read_lora_file", "resolve",
]  # fmt: skip
