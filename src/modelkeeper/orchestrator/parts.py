"""Pipelines from parts: which text encoders and VAE complete a transformer-only Flux or SD3 file.

Users keep a Flux or SD3.5 transformer (bf16, fp8, GGUF...) beside separate T5, CLIP and VAE
files. This module is the policy that pairs them, pure and tested on tables: from what the
transformer needs (:class:`Needs`: its base and the widths its weights expect, read from its
tensor shapes by :func:`needs_from_shapes`) and the registry's text encoders and VAEs
(:class:`Candidate`: standalone models, and the components of Flux and SD3 pipeline folders and
full checkpoints), :func:`resolve` chooses one model per role (:class:`Role`, the diffusers
pipeline slot) or says why a role stays missing. A part the user pinned is checked the same way
and refused with the reason when it does not fit (a CLIP-G given as T5, a 4-channel VAE for Flux).
``completion.py`` feeds it from the registry and the file headers.

Among several parts that fit, the choice is stable: one made for the transformer's own base
first, then full precision, then fp8 (scaled or not), then GGUF forms, then a standalone model
before a component of a folder or checkpoint (a file the user keeps as a part, often the only copy
of those weights outside a pipeline they may delete or move), then by handle. Every transformer of a
base so gets the same T5, and the RAM cache (keyed by content) holds it once for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

#: Bases whose transformer-only files are completed from parts.
PART_BASES = ("flux", "sd3")

#: What each kind is called in messages.
KIND_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5_xxl": "T5-XXL", "clip_h": "CLIP-H", "vae": "VAE"}

#: The widths CLIP encoders have whatever the model (T5's width is read from the transformer).
CLIP_WIDTHS = {"clip_l": 768, "clip_g": 1280}

#: Tensor names (suffixes: a prefix such as ``model.diffusion_model.`` may precede them) whose
#: input width is the text the transformer reads: T5's sequence, and the pooled CLIP vector.
TEXT_KEYS = ("context_embedder.weight", "txt_in.weight")
POOLED_KEYS = (
    "time_text_embed.text_embedder.linear_1.weight",  # diffusers Flux and SD3
    "vector_in.in_layer.weight",  # BFL Flux
    "y_embedder.mlp.0.weight",  # MMDiT SD3
)

Status = Literal["auto", "pinned", "missing", "refused"]


@dataclass(frozen=True)
class Needs:
    """What a transformer expects of its parts: the width of its text input (T5's width), of its
    pooled vector (CLIP-L for Flux; CLIP-L and CLIP-G side by side for SD3), and its VAE's latent
    channels. A width of None is unknown: any width fits."""

    base: str
    text_width: int | None = None
    pooled_width: int | None = None
    latent_channels: int = 16


@dataclass(frozen=True)
class Role:
    """One slot to fill: its name in the diffusers pipeline, the kind of model, and the width
    (hidden size of an encoder, latent channels of a VAE) it must have (None: any)."""

    name: str
    kind: str
    width: int | None

    @property
    def wants(self) -> str:
        """``T5-XXL, 4096 wide`` or ``VAE, 16 latent channels``."""
        kind = KIND_NAMES.get(self.kind, self.kind)
        if self.width is None:
            return kind
        return f"{kind}, {self.width} latent channels" if self.kind == "vae" else f"{kind}, {self.width} wide"


@dataclass(frozen=True)
class Candidate:
    """A registry model that may fill a role: a standalone text encoder or VAE, or (``component``
    set) one component of a pipeline folder or full checkpoint (``id`` and ``handle`` then the
    folder's or checkpoint's)."""

    id: str
    handle: str
    kind: str | None  # clip_l, clip_g, t5_xxl, clip_h for an encoder; vae; None: neither
    width: int | None  # hidden size (encoders) or latent channels (VAE), when known
    base: str = "any"
    bases: tuple[str, ...] = ()  # the bases it fits besides its own
    quant: str | None = None  # fp8 or GGUF form; None: full precision
    unusable: str | None = None  # why a worker cannot load it (file missing, not loadable)
    component: str | None = None  # its name in the folder or checkpoint; None: a standalone model

    @property
    def ref(self) -> str:
        """What names it (and pins it in ``default_settings.parts``): the handle, and for a
        component ``handle:component`` (``tiny-flux-folder:text_encoder_2``)."""
        return self.handle if self.component is None else f"{self.handle}:{self.component}"

    @property
    def key(self) -> str:
        """Unique among candidates: the model id, and for a component ``id:component``."""
        return self.id if self.component is None else f"{self.id}:{self.component}"

    @property
    def describe(self) -> str:
        """``tiny-clip-g (CLIP-G, 1280 wide)``, ``tiny-flux-folder:vae (VAE, 16 latent channels)``."""
        kind = KIND_NAMES.get(self.kind or "", self.kind or "neither a text encoder nor a VAE")
        if self.width is None or self.kind is None:
            return f"{self.ref} ({kind})"
        unit = "latent channels" if self.kind == "vae" else "wide"
        return f"{self.ref} ({kind}, {self.width} {unit})"


@dataclass(frozen=True)
class Choice:
    """The answer for one role: the part chosen (``auto`` or ``pinned``), or none with the reason
    (``missing``: nothing fits; ``refused``: the pinned part does not fit)."""

    role: Role
    status: Status
    candidate: Candidate | None
    why: str

    @property
    def ok(self) -> bool:
        return self.candidate is not None


def roles(needs: Needs) -> tuple[Role, ...]:
    """The slots a transformer of ``needs.base`` is completed with (none for another base)."""
    vae = Role("vae", "vae", needs.latent_channels)
    if needs.base == "flux":
        clip_l = Role("text_encoder", "clip_l", needs.pooled_width or CLIP_WIDTHS["clip_l"])
        return clip_l, Role("text_encoder_2", "t5_xxl", needs.text_width), vae
    if needs.base == "sd3":
        g_width = (
            (needs.pooled_width - CLIP_WIDTHS["clip_l"]) if needs.pooled_width else CLIP_WIDTHS["clip_g"]
        )
        return (
            Role("text_encoder", "clip_l", CLIP_WIDTHS["clip_l"]),
            Role("text_encoder_2", "clip_g", g_width),
            Role("text_encoder_3", "t5_xxl", needs.text_width),
            vae,
        )
    return ()


def _input_width(shapes: Mapping[str, Sequence[int]], keys: Sequence[str]) -> int | None:
    for name, shape in shapes.items():
        if len(shape) == 2 and any(name == k or name.endswith("." + k) for k in keys):
            return int(shape[1])
    return None


def needs_from_shapes(base: str, shapes: Mapping[str, Sequence[int]]) -> Needs:
    """What a ``base`` transformer needs, from its tensor shapes (name -> logical shape, as the
    safetensors or GGUF header gives them): the input widths of its text and pooled projections."""
    return Needs(base, _input_width(shapes, TEXT_KEYS), _input_width(shapes, POOLED_KEYS))


def misfit(role: Role, needs: Needs, cand: Candidate) -> str | None:
    """Why ``cand`` cannot fill ``role`` of a ``needs.base`` transformer; None when it fits."""
    if cand.kind != role.kind:
        return f"{cand.describe} is not a {KIND_NAMES.get(role.kind, role.kind)}"
    if role.width is not None and cand.width is not None and cand.width != role.width:
        unit = "latent channels" if role.kind == "vae" else "wide"
        return f"{cand.describe}: {needs.base} needs {role.width} {unit}"
    if cand.base not in ("any", "unknown", needs.base) and needs.base not in cand.bases:
        fits = ", ".join((cand.base, *cand.bases))
        return f"{cand.describe} is made for {fits}, not {needs.base}"
    if cand.unusable:
        return f"{cand.describe} cannot be loaded: {cand.unusable}"
    return None


def _form_rank(quant: str | None) -> int:
    """0 full precision, 1 fp8 (``float8_*``, ``scaled_float8_*``), 2 a GGUF type (``Q8_0``, ``F16``...)."""
    if quant is None:
        return 0
    return 1 if "float8" in quant else 2


def _rank(needs: Needs, cand: Candidate) -> tuple[bool, int, bool, str, str]:
    return cand.base != needs.base, _form_rank(cand.quant), cand.component is not None, cand.handle, cand.key


def choose(role: Role, needs: Needs, candidates: Sequence[Candidate]) -> Choice:
    """The best candidate for ``role`` (see the module docstring for the order), or a missing
    choice naming the near misses (candidates of the right kind that do not fit, and why)."""
    fits = sorted((c for c in candidates if misfit(role, needs, c) is None), key=lambda c: _rank(needs, c))
    if fits:
        order = (
            f" (first of {len(fits)} that fit: own base, full precision, fp8, GGUF, standalone, handle)"
            if len(fits) > 1
            else ""
        )
        return Choice(role, "auto", fits[0], f"fits {role.wants}{order}")
    near = [reason for c in candidates if c.kind == role.kind and (reason := misfit(role, needs, c))]
    why = "none in the registry" if not near else "none fits (" + "; ".join(near[:3]) + ")"
    return Choice(role, "missing", None, why)


def resolve(
    needs: Needs, candidates: Sequence[Candidate], pins: Mapping[str, Candidate | str] | None = None
) -> list[Choice]:
    """One choice per role of ``needs.base``, then one refused choice per pin of no such role.

    ``pins``: role name -> the pinned candidate, or the reason the pinned reference names no
    usable model (it matches nothing, say). A pinned part is used when it fits, else refused
    with the reason; the other roles are chosen among ``candidates``."""
    pins = pins or {}
    out: list[Choice] = []
    slots = roles(needs)
    for role in slots:
        pin = pins.get(role.name)
        if pin is None:
            out.append(choose(role, needs, candidates))
        elif isinstance(pin, str):
            out.append(Choice(role, "refused", None, pin))
        elif (reason := misfit(role, needs, pin)) is not None:
            out.append(Choice(role, "refused", None, reason))
        else:
            out.append(Choice(role, "pinned", pin, f"pinned in default_settings.parts; fits {role.wants}"))
    names = [r.name for r in slots]
    for name in pins:
        if name not in names:
            why = (
                f"{needs.base} transformers take no part {name!r} (their parts: {', '.join(names) or 'none'})"
            )
            out.append(Choice(Role(name, "", None), "refused", None, why))
    return out
