"""The command types a worker understands: ``<domain>.<verb>``.

The seed's eight commands keep their names; new ones follow the same shape.
"""

from __future__ import annotations

from enum import StrEnum


class CommandType(StrEnum):
    """Every request type of the worker protocol."""

    # handshake and lifecycle
    WORKER_HELLO = "worker.hello"
    WORKER_SHUTDOWN = "worker.shutdown"
    CONTROL_CANCEL = "control.cancel"
    # the seed's commands
    LOAD_MODEL = "model.load_model"
    UNLOAD_MODEL = "model.unload_model"
    GET_MODEL_INFO = "model.get_model_info"
    OPTIMIZE_MEMORY = "model.optimize_memory"
    LOAD_VAE = "model.load_vae"
    LOAD_LORA = "model.load_lora"
    LOAD_ENCODER = "model.load_encoder"
    LOAD_UNET = "model.load_unet"
    # added by modelkeeper
    LOAD_TOKENIZER = "model.load_tokenizer"
    GET_STATUS = "model.get_status"
    CLEANUP = "model.cleanup"
    RELEASE_SEGMENTS = "model.release_segments"
    UNLOAD_LORA = "model.unload_lora"
    SET_LORA_STRENGTH = "model.set_lora_strength"
    VALIDATE_MODEL = "model.validate_model"
    BENCHMARK_MODEL = "model.benchmark_model"
    OPTIMIZE_MODEL = "model.optimize_model"


#: Commands answered at once by the reader, never queued behind device work.
IMMEDIATE_COMMANDS: frozenset[CommandType] = frozenset(
    {
        CommandType.WORKER_HELLO,
        CommandType.GET_MODEL_INFO,
        CommandType.GET_STATUS,
        CommandType.CONTROL_CANCEL,
        CommandType.WORKER_SHUTDOWN,
    }
)
