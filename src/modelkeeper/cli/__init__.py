"""The command line: ``modelkeeper`` (``python -m modelkeeper``).

- ``app.py``: the typer app, which mounts every command, and ``main``.
- ``local.py``: ``protocol-schema``, ``worker``, ``demo-models``.
- ``discovery.py``: ``scan``; ``registry.py``: ``ls``, ``show``, ``meta`` (they open the registry file).
- ``serve.py``: ``serve``, which runs the service.
- The commands that talk to a running service through :mod:`modelkeeper.client`: ``service.py``
  (``status``, ``route``, ``pull``, ``load``, ``unload``, ``optimize-memory``), ``operations.py``
  (``validate``, ``benchmark``, ``optimize``), ``lora.py``, ``cache.py`` and ``jobs.py`` (the
  ``lora``, ``cache`` and ``jobs`` groups); ``remote.py``: what they share (``--url``, ``--token``,
  calling the service, following a job with a progress bar).
- ``common.py``: what several of them share (the ``--db`` and ``--json`` options, sizes, failures).
"""

from modelkeeper.cli.app import app, main

__all__ = ["app", "main"]
