"""A worker's error in the user's words: the model named by its handle, not by the worker's name
for it, the option by the name the user gave it, sizes in decimal units.

A worker names what it loaded by the names the orchestrator gave it (``m-3f1c78f583ae``, the model
id, or ``m-3f1c78f583ae/text_encoder_2``, one of its components) and a bad field by its place in
the request (``data.offload``, ``data.name``). The user knows the model by its handle and asked for
an option, not a request field: :func:`in_users_words` rewrites the message (the details keep the
ids, for programs) before the error leaves the service.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.sizes import format_size

_FIELD = re.compile(r"^data\.(?P<field>[\w.]+): ")
_MIB = re.compile(r"(?P<n>\d+(?:\.\d+)?) MiB\b")


def in_users_words(exc: ProtocolError, handle: str, components: Mapping[str, str]) -> ProtocolError:
    """``exc`` (from a worker, about the components ``components``: label -> worker name of one
    model, ``handle``) with its message naming the model as ``handle (label)``, a request field
    ``data.offload: `` as the option ``offload: `` (``data.name: ``, which names what the message
    names next, dropped) and MiB as decimal sizes. Its code and details are kept."""
    message = exc.message
    for label, name in sorted(components.items(), key=lambda c: -len(c[1])):  # m-x/vae before m-x
        shown = f"{handle} ({label})"
        message = message.replace(f"'{name}'", shown).replace(name, shown)
    field = _FIELD.match(message)
    if field is not None:
        rest = message[field.end() :]
        message = rest if field["field"] == "name" else f"{field['field']}: {rest}"
    message = _MIB.sub(lambda m: format_size(float(m["n"]) * (1 << 20)), message)
    exc.message = message
    exc.args = (message, *exc.args[1:])
    return exc


__all__ = ["in_users_words"]
