"""``python -m modelkeeper.worker --device cuda:0``: a worker on stdin/stdout, logs on stderr.

A worker that cannot start (a device that does not exist, CUDA missing, a torch too old) says
why on stderr and, before it exits with code 2, as one error response with no ``request_id`` on
stdout: the service reads that as the reason its worker did not start (docs/SERVICE.md)."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

from modelkeeper.protocol.codec import encode, make_error
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.worker.arguments import parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s worker %(levelname)s %(name)s: %(message)s",
    )

    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    import torch

    from modelkeeper.formats._pickle_child import ChildError, check_torch_version

    try:  # older weights_only loaders have known bypasses: refuse to run at all
        check_torch_version(torch.__version__)
    except ChildError as exc:
        return refuse(
            protocol_out, ProtocolError(f"{exc}; modelkeeper needs torch >= 2.10", ErrorCode.INTERNAL)
        )

    from modelkeeper.worker.inprocess import build_server

    try:
        server = build_server(
            args.device, protocol_out.write, reserve_mb=args.reserve_mb, budget_mb=args.budget_mb,
            throttle_mb_s=args.throttle_mb_s,
        )  # fmt: skip
    except ProtocolError as exc:
        return refuse(protocol_out, exc)
    if args.warm:
        from modelkeeper.worker.warm import start_warm_up

        start_warm_up(server.service.memory.device)
    server.serve(sys.stdin.buffer)
    protocol_out.close()
    return 0


def refuse(out: IO[bytes], exc: ProtocolError) -> int:
    """Say why the worker cannot start, on stderr and on the protocol's stdout; exit code 2."""
    print(f"modelkeeper worker: {exc}", file=sys.stderr)
    try:
        out.write(encode(make_error(exc, None)))
        out.close()
    except OSError:  # nobody reads stdout: stderr said it
        pass
    return 2


if __name__ == "__main__":
    sys.exit(main())
