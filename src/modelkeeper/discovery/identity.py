"""What tells an unhashed copy of a file from another file: its content key.

Hashing a 7 GB checkpoint takes a while; until it is done, a copy of a file (the same model under
a ComfyUI and an A1111 folder) should not be a second model. The content key is a digest of the
size, the first 64 KiB (the header: tensor names, shapes, dtypes, offsets and metadata of a
safetensors or GGUF file) and 64 KiB from the middle and from the end of the data.

The header alone is not enough: two fine-tunes of one architecture saved by one tool have the
same header byte for byte; their weights differ nearly everywhere, so the samples tell them
apart. Two files with the same key are taken as one content *provisionally*: once hashed, files
whose BLAKE3 differs are split back into models of their own (``modelkeeper.registry.locations``).
Symlinks and hard links need no key: they share a device and an inode.
"""

from __future__ import annotations

import os

import blake3

__all__ = ["SAMPLE", "content_key"]

SAMPLE = 64 * 1024


def content_key(path: str | os.PathLike[str]) -> str | None:
    """The content key of the file at ``path``; None when it cannot be read (the scan reports why)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = blake3.blake3(size.to_bytes(8, "little"))
            h.update(f.read(SAMPLE))
            for offset in (size // 2, size - SAMPLE):
                if offset > SAMPLE:
                    f.seek(offset)
                    h.update(f.read(SAMPLE))
    except OSError:
        return None
    return h.hexdigest()[:32]
