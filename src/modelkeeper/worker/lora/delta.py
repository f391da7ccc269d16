"""A LoRA layer's weight delta, prepared once on the device in the weight's dtype."""

from __future__ import annotations

import torch

from modelkeeper.worker.lora.parse import Factors


class Delta:
    """One layer's weight delta, prepared on the device in the weight's dtype: ``up`` [rows, r] and
    ``down`` [r, cols] for LoRA (and LoHa, rewritten as one product of rank r1*r2 when that is
    smaller than the weight), the two Kronecker factors for LoKr, or a dense matrix."""

    def __init__(self, factors: Factors, device: torch.device, dtype: torch.dtype) -> None:
        self.scale, self.shape = factors.scale, factors.shape
        self.up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        self.kron: tuple[torch.Tensor, torch.Tensor] | None = None
        rows = self.shape[0]
        if factors.algo == "lora":
            up, down = factors.tensors["up"], factors.tensors["down"]
            self.up = up.reshape(rows, -1).to(device=device, dtype=dtype).contiguous()
            self.down = down.reshape(down.shape[0], -1).to(device=device, dtype=dtype).contiguous()
            return
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in factors.tensors.items()}
        if factors.algo == "loha":
            a1, b1, a2, b2 = (t[k].reshape(t[k].shape[0], -1) for k in ("w1a", "w1b", "w2a", "w2b"))
            r1, r2, cols = a1.shape[1], a2.shape[1], b1.shape[1]
            if r1 * r2 * (rows + cols) < rows * cols:  # (A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2), Khatri-Rao
                self.up = (a1[:, :, None] * a2[:, None, :]).reshape(rows, r1 * r2).to(dtype)
                self.down = (b1[:, None, :] * b2[None, :, :]).reshape(r1 * r2, cols).to(dtype)
            else:
                self.dense = ((a1 @ b1) * (a2 @ b2)).to(dtype)
        elif factors.algo == "lokr":
            w1 = t["k1"] if "k1" in t else t["k1a"] @ t["k1b"]
            w2 = t["k2"] if "k2" in t else (t["k2a"] @ t["k2b"].flatten(1)).reshape(-1, *t["k2b"].shape[1:])
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
            self.kron = (w1.to(dtype), w2.to(dtype))
        else:
            self.dense = t["diff"].reshape(rows, -1).to(dtype)

    @property
    def nbytes(self) -> int:
        parts = [self.up, self.down, self.dense, *(self.kron or ())]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def add_to(self, out: torch.Tensor, alpha: float, src: slice | None) -> None:
        """``out += alpha * delta[src]``, ``out`` a [rows, cols] view of the weight."""
        if (
            self.up is not None and self.down is not None
        ):  # the casts do nothing unless the model's dtype changed
            up = self.up if src is None else self.up[src]
            out.addmm_(up.to(out.dtype), self.down.to(out.dtype), alpha=alpha)
            return
        dense = torch.kron(*self.kron).reshape(self.shape[0], -1) if self.kron else self.dense
        assert dense is not None
        out.add_((dense if src is None else dense[src]).to(out.dtype), alpha=alpha)
