"""The command line: ``modelkeeper`` (``python -m modelkeeper``).

- ``app.py``: the typer app, which mounts every command, and ``main``.
- ``local.py``: ``protocol-schema``, ``worker``, ``demo-models``.
- ``discovery.py``: ``scan``; ``registry.py``: ``ls``, ``show``, ``meta`` (they open the registry file).
- ``service.py``: ``serve`` and the commands that talk to a running service through
  :mod:`modelkeeper.client`.
- ``common.py``: what several of them share (the ``--db`` and ``--json`` options, sizes, failures).
"""

from modelkeeper.cli.app import app, main

__all__ = ["app", "main"]
