"""Validation of a live module at three levels, each including the ones before it.

- ``header``: structure (the state-dict keys and shapes a fresh meta-device module of the same
  class and config would have), materialised floating dtypes, one device.
- ``weights``: every tensor read on the device: NaN / Inf counted (a failure), per-tensor min, max,
  mean and std summarised as ranges, zero and constant tensors listed (information).
- ``functional``: a forward pass with tiny seeded inputs gives finite outputs of the right shape
  (UNet with SDXL's added conditioning, Flux / SD3 transformer, ControlNet, VAE encode and decode,
  CLIP / T5 text encoder); :func:`validate_generation` runs one denoising step of a whole set.

Why: a model that loads can still be wrong (a conversion that zeroed a block, an fp16 overflow, a
config that does not match the weights); these checks find that before a user's job does.
:func:`probes` (example inputs per class) is shared with :mod:`modelkeeper.worker.bench`.

Proposed protocol: ``model.validate_model`` data ``{name, level: header|weights|functional,
batch?: 1}``; result :meth:`ValidationReport.as_dict` ``{name, class_name, level, passed, checks:
[{name, level, passed, detail, seconds, data}], seconds}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from modelkeeper.worker.errors import InvalidRequest
from modelkeeper.worker.storage import FLOAT8, compute_dtype, logical_shapes, stored_forms

Level = Literal["header", "weights", "functional"]
LEVELS: tuple[Level, ...] = ("header", "weights", "functional")

#: Called before each step of a long operation with the step's name, the steps done and the steps
#: in all; it may raise to stop the operation there (the worker's cancellation, ``Operation.step``).
Step = Callable[[str, int, int], None]


def no_step(name: str, done: int, total: int) -> None:
    """The :data:`Step` of a caller that neither cancels nor follows progress."""


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Check:
    """One check: ``passed`` False means the model is broken in that respect; ``data`` has figures."""

    name: str
    level: Level
    passed: bool
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationReport:
    class_name: str
    level: Level
    passed: bool
    checks: list[Check]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate(
    module: torch.nn.Module, level: Level = "header", *, batch: int = 1, seed: int = 0, step: Step = no_step
) -> ValidationReport:
    """Run every check up to ``level`` on ``module`` where it lives; ``passed`` if all passed.
    ``step`` runs before each check and may raise (cancellation stops it between two checks)."""
    if level not in LEVELS:
        raise InvalidRequest(f"data.level: {level!r} is not one of {', '.join(LEVELS)}")
    started = time.perf_counter()
    checks: list[Check] = []
    steps: list[tuple[Level, str, Callable[[], tuple[bool, str, dict[str, Any]]]]] = [
        ("header", "structure", lambda: _structure(module)),
        ("header", "dtypes", lambda: _dtypes(module)),
        ("header", "device", lambda: _device(module)),
    ]
    if LEVELS.index(level) >= 1:
        stats = _Stats(module)
        steps += [("weights", "finite", stats.finite), ("weights", "statistics", stats.summary)]
    if level == "functional":
        for probe in probes(module, batch=batch, seed=seed):
            steps.append(("functional", probe.name, lambda p=probe: _run_probe(p)))  # type: ignore[misc]
    for i, (lvl, name, run) in enumerate(steps):
        step(name, i, len(steps))
        checks.append(_timed(lvl, name, run))
    if level == "functional" and not any(c.level == "functional" for c in checks):
        detail = f"skipped: no example inputs for {type(module).__name__}"
        checks.append(Check("forward", "functional", True, detail, 0.0))
    passed = all(c.passed for c in checks)
    return ValidationReport(
        type(module).__name__, level, passed, checks, round(time.perf_counter() - started, 6)
    )


def _timed(level: Level, name: str, run: Callable[[], tuple[bool, str, dict[str, Any]]]) -> Check:
    started = time.perf_counter()
    try:
        passed, detail, data = run()
    except Exception as exc:  # a check that crashes is a failed check, with the reason
        passed, detail, data = False, f"{type(exc).__name__}: {exc}", {}
    return Check(name, level, passed, detail, round(time.perf_counter() - started, 6), data)


# ----------------------------------------------------------------------------- header


def meta_twin(module: torch.nn.Module) -> torch.nn.Module | None:
    """A fresh module of the same class and config on the meta device (no memory, no init)."""
    from accelerate import init_empty_weights
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel

    with init_empty_weights(include_buffers=True):
        if isinstance(module, ModelMixin):
            twin: torch.nn.Module = _config_of(type(module)).from_config(module.config)
            return twin
        if isinstance(module, PreTrainedModel):
            return type(module)(module.config)
    return None


def _config_of(obj: object) -> Any:
    """``obj`` typed loosely: diffusers' configs and classmethods are untyped."""
    return obj


def _structure(module: torch.nn.Module) -> tuple[bool, str, dict[str, Any]]:
    twin = meta_twin(module)
    if twin is None:
        return True, f"skipped: {type(module).__name__} is not a diffusers or transformers model", {}
    packed = logical_shapes(module)
    got = {k: packed.get(k, tuple(v.shape)) for k, v in module.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    shapes = [
        f"{k} {got[k]} vs config {want[k]}" for k in sorted(got.keys() & want.keys()) if got[k] != want[k]
    ]
    data = {
        "tensors": len(got),
        "missing": missing[:20],
        "unexpected": unexpected[:20],
        "mismatched": shapes[:20],
    }
    if missing or unexpected or shapes:
        parts = [f"{len(x)} {what}" for x, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                    (shapes, "of another shape")) if x]  # fmt: skip
        example = (shapes or missing or unexpected)[0]
        return False, f"keys/shapes differ from the config: {', '.join(parts)} (e.g. {example})", data
    return True, f"{len(got)} tensors match the {type(module).__name__} config", data


def _dtypes(module: torch.nn.Module) -> tuple[bool, str, dict[str, Any]]:
    counts: dict[str, int] = {}
    meta = []
    forms = stored_forms(module)  # packed weights count under their form (gguf:Q8_0, ...)
    for name, param in module.named_parameters():
        key = forms.get(name) or str(param.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + param.numel()
        if param.is_meta:
            meta.append(name)
    odd = [d for d in counts if d not in forms.values() and getattr(torch, d) not in FLOATS
           and not d.startswith("float8")]  # fmt: skip
    passed = not meta and not odd
    detail = ", ".join(f"{d}: {n:,}" for d, n in sorted(counts.items(), key=lambda x: -x[1]))
    if meta:
        detail = f"{len(meta)} parameters were never loaded (meta), e.g. {meta[0]}; {detail}"
    elif odd:
        detail = f"non-floating parameters ({', '.join(odd)}); {detail}"
    return passed, detail, {"parameters_by_dtype": counts, "meta": meta[:20]}


def _device(module: torch.nn.Module) -> tuple[bool, str, dict[str, Any]]:
    devices = sorted({str(t.device) for t in [*module.parameters(), *module.buffers()]})
    return len(devices) <= 1, f"on {', '.join(devices) or 'no tensors'}", {"devices": devices}


# ----------------------------------------------------------------------------- weights


class _Stats:
    """Per-tensor statistics computed on the device (fp32) and moved to the host once."""

    COLUMNS = ("nan", "inf", "zero", "min", "max", "mean", "std")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.names: list[str] = []
        self.table: list[list[float]] = []
        self.other = self.elements = 0
        self.done = False

    def _compute(self) -> None:
        """Runs inside the first check that needs it (so that check's time includes the read)."""
        if self.done:
            return
        rows: list[torch.Tensor] = []
        with torch.no_grad():
            for name, tensor in self.module.state_dict().items():
                self.elements += tensor.numel()
                if tensor.dtype not in (*FLOATS, *FLOAT8) or tensor.numel() == 0:
                    self.other += 1
                    continue
                x = tensor.detach().float()
                std, mean = torch.std_mean(x, correction=0)
                row = [x.isnan().sum(), x.isinf().sum(), (x == 0).all(), x.min(), x.max(), mean, std]
                rows.append(torch.stack([v.float() for v in row]))
                self.names.append(name)
        self.table = torch.stack(rows).cpu().tolist() if rows else []
        self.done = True

    def finite(self) -> tuple[bool, str, dict[str, Any]]:
        self._compute()
        bad = [(n, int(r[0]), int(r[1])) for n, r in zip(self.names, self.table, strict=True) if r[0] or r[1]]
        nan, inf = sum(b[1] for b in bad), sum(b[2] for b in bad)
        data = {"nan_count": nan, "inf_count": inf, "tensors": [b[0] for b in bad][:20]}
        if bad:
            return False, f"{nan} NaN and {inf} Inf values in {len(bad)} tensor(s), e.g. {bad[0][0]}", data
        return True, f"{len(self.names)} floating tensors, all finite", data

    def summary(self) -> tuple[bool, str, dict[str, Any]]:
        self._compute()
        ok = [(n, r) for n, r in zip(self.names, self.table, strict=True) if not (r[0] or r[1])]
        if not ok:
            return True, "no finite tensors to summarise", {}
        col = {c: i for i, c in enumerate(self.COLUMNS)}
        zero = [n for n, r in ok if r[col["zero"]]]
        constant = [n for n, r in ok if r[col["std"]] == 0 and not r[col["zero"]]]
        absmax_name, _ = max(ok, key=lambda x: max(abs(x[1][col["min"]]), abs(x[1][col["max"]])))
        std_range = [min(r[col["std"]] for _, r in ok), max(r[col["std"]] for _, r in ok)]
        low, high = min(r[col["min"]] for _, r in ok), max(r[col["max"]] for _, r in ok)
        data: dict[str, Any] = {
            "tensors": len(self.names), "other_tensors": self.other, "elements": self.elements,
            "min": low, "max": high, "std_range": std_range,
            "mean_range": [min(r[col["mean"]] for _, r in ok), max(r[col["mean"]] for _, r in ok)],
            "absmax_tensor": absmax_name, "zero_tensors": zero[:20], "zero_count": len(zero),
            "constant_count": len(constant),
        }  # fmt: skip
        detail = (f"values in [{low:.4g}, {high:.4g}] (largest in {absmax_name}), std per tensor "
                  f"{std_range[0]:.3g}..{std_range[1]:.3g}; {len(zero)} all-zero, "
                  f"{len(constant)} constant tensor(s)")  # fmt: skip
        return True, detail, data


# ----------------------------------------------------------------------------- functional


@dataclass
class Probe:
    """One forward call with example inputs: ``run`` returns the main output; ``expected`` is its
    shape (``None``: only the batch size is known)."""

    name: str
    run: Callable[[], torch.Tensor]
    expected: tuple[int, ...] | None
    inputs: dict[str, list[int]]


def _first_float(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the module runs and in which dtype (a packed module: its compute dtype)."""
    packed = compute_dtype(module)
    for t in module.parameters():
        if packed is not None:
            return t.device, packed
        if t.dtype in FLOATS:
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def probes(
    module: torch.nn.Module, *, batch: int = 1, resolution: int | None = None, tokens: int | None = None,
    seed: int = 0,
) -> list[Probe]:  # fmt: skip
    """Example forward calls of ``module``: at ``resolution`` pixels (default: the smallest size the
    model accepts, for validation) with ``tokens`` text tokens. Empty for classes it does not know."""
    device, dtype = _first_float(module)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    name = type(module).__name__
    cfg: Any = getattr(module, "config", None)
    if name in ("UNet2DConditionModel", "ControlNetModel"):
        return _unet_probes(module, cfg, batch, resolution, tokens or 8, randn, name == "ControlNetModel")
    if name == "AutoencoderKL":
        vae = _config_of(module)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        size = resolution or 4 * factor
        image = randn(batch, cfg.in_channels, size, size)
        latents = randn(batch, cfg.latent_channels, size // factor, size // factor)

        def encode() -> torch.Tensor:
            return vae.encode(image).latent_dist.mode()  # type: ignore[no-any-return]

        def decode() -> torch.Tensor:
            return vae.decode(latents).sample  # type: ignore[no-any-return]

        return [
            Probe("encode", encode, tuple(latents.shape), {"sample": list(image.shape)}),
            Probe("decode", decode, (batch, cfg.out_channels, size, size), {"latents": list(latents.shape)}),
        ]
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
        length = tokens or 8
        if name != "T5EncoderModel":
            length = min(length, cfg.max_position_embeddings)
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen).to(device)
        width = cfg.d_model if name == "T5EncoderModel" else cfg.hidden_size
        return [Probe("forward", lambda: module(input_ids=ids).last_hidden_state, (batch, length, width),
                      {"input_ids": [batch, length]})]  # fmt: skip
    if name == "FluxTransformer2DModel":
        side = max(2, (resolution or 64) // 16)
        seq, text = side * side, tokens or 8
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(
            seq, 2
        )
        img_ids = torch.cat([torch.zeros(seq, 1), grid.float()], 1).to(device=device, dtype=dtype)
        args = {"hidden_states": randn(batch, seq, cfg.in_channels), "encoder_hidden_states": randn(batch, text, cfg.joint_attention_dim),
                "pooled_projections": randn(batch, cfg.pooled_projection_dim), "img_ids": img_ids,
                "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
                "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
                "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None}  # fmt: skip
        out = cfg.out_channels or cfg.in_channels
        return [Probe("forward", lambda: module(**args).sample, (batch, seq, out), _shapes(args))]
    if name == "SD3Transformer2DModel":
        side = max(cfg.patch_size * 2, (resolution or 64) // 8)
        args = {"hidden_states": randn(batch, cfg.in_channels, side, side), "encoder_hidden_states": randn(batch, tokens or 8, cfg.joint_attention_dim),
                "pooled_projections": randn(batch, cfg.pooled_projection_dim),
                "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype)}  # fmt: skip
        return [
            Probe(
                "forward", lambda: module(**args).sample, (batch, cfg.out_channels, side, side), _shapes(args)
            )
        ]
    return []


def _unet_probes(
    module: torch.nn.Module, cfg: Any, batch: int, resolution: int | None, tokens: int,
    randn: Callable[..., torch.Tensor], controlnet: bool,
) -> list[Probe]:  # fmt: skip
    device, dtype = _first_float(module)
    side = resolution // 8 if resolution else max(8, 2 ** (len(cfg.down_block_types) - 1))
    args: dict[str, Any] = {
        "sample": randn(batch, cfg.in_channels, side, side),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": randn(batch, tokens, cfg.cross_attention_dim),
    }
    if cfg.addition_embed_type == "text_time":
        total, each = cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim
        count = next(
            (n for n in (6, 5) if total - n * each in (1280, 1024, 768)), 6
        )  # SDXL base 6 ids, refiner 5
        args["added_cond_kwargs"] = {
            "text_embeds": randn(batch, total - count * each),
            "time_ids": randn(batch, count),
        }
    elif cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
        return []
    if controlnet:
        args["controlnet_cond"] = randn(batch, cfg.conditioning_channels, side * 8, side * 8)
        return [Probe("forward", lambda: module(**args).mid_block_res_sample, None, _shapes(args))]
    return [
        Probe("forward", lambda: module(**args).sample, (batch, cfg.out_channels, side, side), _shapes(args))
    ]


def _shapes(args: Mapping[str, Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key, value in args.items():
        if isinstance(value, torch.Tensor):
            out[key] = list(value.shape)
        elif isinstance(value, Mapping):
            out |= {f"{key}.{k}": list(v.shape) for k, v in value.items()}
    return out


def _run_probe(probe: Probe) -> tuple[bool, str, dict[str, Any]]:
    with torch.inference_mode():
        out = probe.run()
    shape = tuple(out.shape)
    finite = bool(torch.isfinite(out).all())
    right = shape == probe.expected if probe.expected else shape[0] == next(iter(probe.inputs.values()))[0]
    data = {"inputs": probe.inputs, "output_shape": list(shape), "expected_shape": list(probe.expected or ()),
            "output_std": float(out.float().std()) if out.numel() > 1 and finite else math.nan}  # fmt: skip
    if not finite:
        return False, f"output {shape} has {int((~torch.isfinite(out)).sum())} non-finite values", data
    if not right:
        return False, f"output shape {shape}, expected {probe.expected}", data
    return True, f"output {shape}, finite", data


def validate_generation(
    components: Mapping[str, torch.nn.Module], *, resolution: int | None = None, seed: int = 0
) -> Check:
    """One denoising step through a whole SD1/SD2/SDXL set (``text_encoder``, optional
    ``text_encoder_2``, ``unet``, ``vae``): prompt ids -> embeddings -> one Euler step -> decode.
    Passes when the image is finite and of the right size."""

    def run() -> tuple[bool, str, dict[str, Any]]:
        unet, vae = _config_of(components["unet"]), _config_of(components["vae"])
        device, dtype = _first_float(unet)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        encoders = [_config_of(components[k]) for k in ("text_encoder", "text_encoder_2") if k in components]
        with torch.inference_mode():
            hidden, pooled = [], None
            for enc in encoders:
                ids = torch.randint(0, enc.config.vocab_size, (1, 8), generator=gen).to(device)
                out = enc(input_ids=ids, output_hidden_states=len(encoders) > 1)
                hidden.append(out.hidden_states[-2] if len(encoders) > 1 else out.last_hidden_state)
                pooled = getattr(out, "text_embeds", None)
            context = torch.cat(hidden, -1).to(dtype)
            (probe,) = _unet_probes(
                unet,
                unet.config,
                1,
                resolution,
                8,
                lambda *s: torch.randn(*s, generator=gen).to(device, dtype),
                False,
            )
            sigma = 14.6  # SD's sigma at t=999; one Euler step from there to the clean latents
            sample = torch.randn(*probe.inputs["sample"], generator=gen).to(device, dtype) * sigma
            extra: dict[str, Any] = {}
            if unet.config.addition_embed_type == "text_time" and pooled is not None:
                side = [sample.shape[-2] * 8, sample.shape[-1] * 8]
                ids = torch.tensor([[*side, 0, 0, *side]], device=device, dtype=dtype)
                extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": ids}
            timestep = torch.tensor([999.0], device=device)
            eps = unet(
                sample / math.sqrt(sigma**2 + 1), timestep, encoder_hidden_states=context, **extra
            ).sample
            clean = sample - sigma * eps
            image = vae.decode(clean.to(_first_float(vae)[1]) / vae.config.scaling_factor).sample
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        expected = (1, vae.config.out_channels, sample.shape[-2] * factor, sample.shape[-1] * factor)
        finite = bool(torch.isfinite(image).all())
        data = {"image_shape": list(image.shape), "context_shape": list(context.shape)}
        passed = finite and tuple(image.shape) == expected
        return passed, f"image {tuple(image.shape)} {'finite' if finite else 'NOT finite'}", data

    return _timed("functional", "generation", run)


__all__ = [
    "LEVELS",
    "Check",
    "Level",
    "Probe",
    "Step",
    "ValidationReport",
    "meta_twin",
    "no_step",
    "probes",
    "validate",
    "validate_generation",
]
