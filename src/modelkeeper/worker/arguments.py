"""The worker's command-line arguments: ``python -m modelkeeper.worker`` reads them, and the
in-process worker takes the same (``InProcessWorker.start``)."""

from __future__ import annotations

import argparse
import os

DESCRIPTION = "``python -m modelkeeper.worker --device cuda:0``: a worker on stdin/stdout, logs on stderr."


def parser() -> argparse.ArgumentParser:
    """The worker's arguments."""
    parser = argparse.ArgumentParser(prog="python -m modelkeeper.worker", description=DESCRIPTION)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--reserve-mb",
        type=float,
        default=None,
        help="memory kept free for work (default: 1024 on CUDA, 2048 on CPU)",
    )
    parser.add_argument("--budget-mb", type=float, default=None, help="cap on what models may use")
    parser.add_argument(
        "--throttle-mb-s", type=float, default=None, help="cap the read rate (simulates a slow disk)"
    )
    parser.add_argument(
        "--warm", action="store_true", help="import the model libraries and open the device in the background"
    )
    parser.add_argument("--log-level", default=os.environ.get("MODELKEEPER_LOG_LEVEL", "WARNING"))
    return parser
