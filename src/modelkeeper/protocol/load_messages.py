"""Messages of the load commands: a model onto its worker's device (``model.load_*``) and off it
(``model.unload_model``). ``messages.py`` maps each command to its pair (``COMMAND_MODELS``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from modelkeeper.protocol.message_base import (
    DType,
    KeyLayout,
    MemoryInfo,
    ModelKind,
    _Held,
    _Open,
    _Strict,
)


class LoadRequest(_Strict):
    """Data of every load command. ``model.load_model`` needs ``type``; the others imply it."""

    name: str = Field(min_length=1, max_length=500, description="Key under which the model is kept.")
    path: str = Field(min_length=1, description="A diffusers folder (pipeline or component) or a file.")
    type: ModelKind | Literal["encoder"] | None = None
    subfolder: str | None = Field(None, description="Component folder inside a pipeline folder.")
    variant: str | None = Field(None, description="Weight variant of a diffusers folder, e.g. fp16.")
    dtype: DType | None = Field(
        None,
        description="Compute dtype (float32, float16, bfloat16); default keeps the file's dtype "
        "(fp8 files: their norms and biases' dtype; quantized GGUF: bfloat16).",
    )
    storage_dtype: DType | None = Field(
        None,
        description="Dtype the weights are kept in on the device, upcast to the compute dtype layer by "
        "layer as it runs (float8_e4m3fn, float8_e5m2). Default: the file's own form (fp8 and GGUF "
        "files stay packed), else the compute dtype.",
    )
    layout: KeyLayout = KeyLayout.AUTO
    config: dict[str, Any] | str | None = Field(
        None, description="Model config for a single file: a dict or a path to config.json or a folder."
    )
    encoder: str | None = Field(None, description="clip_l, clip_g, t5 (a hint; the config decides).")
    estimated_size_mb: float | None = Field(None, ge=0)
    allow_evict: bool = Field(False, description="Unload least-recently-used models to make room.")
    replace: bool = Field(False, description="Unload a model of the same name first.")
    offload: Literal["none", "auto"] | Annotated[int, Field(strict=True, ge=0)] = Field(
        "none",
        description="Partial residency: `none` loads the whole model or refuses it (INSUFFICIENT_MEMORY); "
        "`auto` keeps resident what fits the device budget and streams the rest of its blocks from host "
        "memory as the forward pass reaches them; a byte count keeps at most that many bytes of weights "
        "resident (the parts outside the blocks always are).",
    )
    share: str | None = Field(
        None,
        description="A token naming the weights and config (the orchestrator gives a part's model and "
        "content id). A load with one, `offload: none`, shares the module this worker holds under the same "
        "token, type, dtype and storage_dtype: one module, several names, freed with its last name.",
    )

    def share_key(self) -> str | None:
        """What a module loaded by this request is shared by (None: never shared): the token and the
        form it is loaded in. Two requests with one key load one module."""
        if self.share is None or self.offload != "none":
            return None
        form = [self.type or "", self.dtype or "file", self.storage_dtype or "file"]
        return "|".join([self.share, *(str(getattr(f, "value", f)) for f in form)])


class LoadResult(_Held):
    source: dict[str, Any]
    evicted: list[str] = Field(default_factory=list)
    memory: MemoryInfo
    vocab_size: int | None = Field(None, description="Tokenizers only.")
    storage: str | None = Field(
        None,
        description="How the weights are kept when not in the compute dtype: float8_e4m3fn, "
        "float8_e5m2, scaled_float8_e4m3fn, or the dominant GGUF quant (gguf:Q8_0, ...).",
    )
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds per stage: plan, read, convert, assemble, total."
    )


class UnloadRequest(_Strict):
    name: str = Field(min_length=1)


class UnloadResult(_Open):
    name: str
    freed_bytes: int
    memory_before: MemoryInfo
    memory_after: MemoryInfo
