"""The device a worker owns, and its memory: totals from torch (CUDA) or the OS (CPU), a budget."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from modelkeeper.protocol.messages import DeviceInfo, MemoryInfo
from modelkeeper.worker.errors import InvalidRequest

MiB = 1024 * 1024
DEFAULT_CUDA_RESERVE = 1024 * MiB
DEFAULT_CPU_RESERVE = 2048 * MiB


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``; ``auto`` is cuda:0 where CUDA is available, else cpu."""
    if spec == "auto":
        spec = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InvalidRequest(f"device {spec!r} is not a device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"CUDA is not available in this torch build (torch {torch.__version__})"
                if torch.version.cuda is None
                else "CUDA is not available on this machine (no GPU visible, or no driver)"
            )
            raise InvalidRequest(f"device {spec!r}: {why}")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise InvalidRequest(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise InvalidRequest(f"device {spec!r}: only cpu and cuda devices are supported")
    return device


@dataclass
class DeviceMemory:
    """Reads the device's memory and applies the budget: what models may use.

    ``budget_bytes`` defaults to total minus ``reserve_bytes`` (room for activations and the
    allocator); an explicit budget caps it further.
    """

    device: torch.device
    reserve_bytes: int
    budget_override: int | None = None
    _info: DeviceInfo | None = None
    _process: psutil.Process | None = None

    @classmethod
    def for_device(
        cls, device: torch.device, reserve_mb: float | None = None, budget_mb: float | None = None
    ) -> DeviceMemory:
        default = DEFAULT_CUDA_RESERVE if device.type == "cuda" else DEFAULT_CPU_RESERVE
        reserve = default if reserve_mb is None else int(reserve_mb * MiB)
        budget = None if budget_mb is None else int(budget_mb * MiB)
        return cls(device, reserve, budget)

    def info(self) -> DeviceInfo:
        if self._info is None:
            if self.device.type == "cuda":
                name = torch.cuda.get_device_name(self.device)
                self._info = DeviceInfo(kind="cuda", index=self.device.index, name=name)
            else:
                self._info = DeviceInfo(kind="cpu", index=None, name=_cpu_name())
        return self._info

    def totals(self) -> tuple[int, int, int]:
        """(total, free, allocated-by-this-process) in bytes."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return total, free, torch.cuda.memory_allocated(self.device)
        vm = psutil.virtual_memory()
        if self._process is None:
            self._process = psutil.Process()
        return vm.total, vm.available, self._process.memory_info().rss

    def budget(self, total: int | None = None) -> int:
        if total is None:
            total = self.totals()[0]
        budget = max(0, total - self.reserve_bytes)
        return budget if self.budget_override is None else min(budget, self.budget_override)

    def snapshot(self, models_bytes: int) -> MemoryInfo:
        total, free, allocated = self.totals()
        return MemoryInfo(
            total_bytes=total,
            free_bytes=free,
            reserve_bytes=self.reserve_bytes,
            budget_bytes=self.budget(total),
            models_bytes=models_bytes,
            allocated_bytes=allocated,
        )

    def allocated(self) -> int:
        """Bytes held by live tensors on the device (CUDA); RSS on the CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self.totals()[2]

    def cached(self) -> int:
        """Bytes the CUDA caching allocator keeps for reuse (free for our budget, not for others)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        return 0

    def release_caches(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"
