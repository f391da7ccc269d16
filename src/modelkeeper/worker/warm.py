"""Warm-up at start (``--warm``): import the model libraries and open the device's context in a
background thread, so a service's first load does not pay for them (diffusers alone imports in
3 to 6 s). Status requests are served meanwhile; a load waits for the warm-up to finish
(``wait_for_warm_up``): diffusers' lazy modules are not safe to import from two threads at once."""

from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)


def _warm(device: torch.device) -> None:
    started = time.perf_counter()
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401

        if device.type == "cuda":
            torch.empty(1, device=device)  # the CUDA context: a second or more on first use
    except Exception as exc:  # a warm-up failure only means a slower first load
        log.warning("warm-up failed: %s", exc)
        return
    log.info("warm-up done in %.2f s", time.perf_counter() - started)


_thread: threading.Thread | None = None


def start_warm_up(device: torch.device) -> threading.Thread:
    global _thread
    _thread = threading.Thread(target=_warm, args=(device,), name="warm-up", daemon=True)
    _thread.start()
    return _thread


def wait_for_warm_up() -> None:
    """Return once no warm-up is running (at once when none was started)."""
    thread = _thread
    if thread is not None and thread.is_alive():
        thread.join()
