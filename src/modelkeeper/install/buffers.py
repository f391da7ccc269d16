"""The receiving side of a transfer: a few large reusable buffers, each written to the partial file
by the receiving thread and hashed, in order, by a helper thread that hands it back for reuse.

Each byte is received once into a buffer; hashing (hashlib releases the GIL) overlaps the
transfer, and the bounded set of buffers keeps the hash in step with it. A resumed partial's
existing bytes are hashed by the same thread first, while the rest arrives. ``transfer`` drives
it; ``body`` fills the buffers.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["READ_SIZE", "Hasher", "OnBytes", "Writer", "write_all"]

READ_SIZE = 4 * 1024 * 1024  # prefix hashing and local copies
_BUFFER = 4 * 1024 * 1024  # one receive buffer, hashed as a whole (1 MiB ones: 10-20% more CPU
# per byte here, four times the hand-overs between the threads)
# At most this much per write. Linux 6.x page caches (ext4 with large folios) size the folios
# they allocate by the write's length: 1 MiB writes cost 0.8-0.9 CPU-s per GB here, often more
# (high-order allocations on a fragmented machine), 256 KiB writes 0.2-0.3.
_WRITE_SIZE = 256 * 1024
_BUFFERS = 6  # buffers in flight between the receiving and the hashing thread (few: the hash keeps
# in step with the transfer, so little is left to hash after the last byte)

OnBytes = Callable[[int], None]


class Hasher:
    """Hashes, in order and on a helper thread, the buffers the receiving thread filled (and wrote),
    then hands each back for reuse. At most :data:`_BUFFERS` buffers exist: :meth:`take` waits for
    one while all are being hashed, which bounds the memory and the hash's lag. A hashing error
    surfaces on the next :meth:`take` or on :meth:`close`."""

    def __init__(self, fd: int, *, prefix: int, git_size: int | None, size: int | None) -> None:
        self._fd = fd
        self._buffer_size = _BUFFER if size is None else max(1, min(_BUFFER, size))  # small files: small
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {git_size}\0".encode()) if git_size is not None else None
        self._filled: queue.SimpleQueue[tuple[bytearray, int] | int | None] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="install-hasher", daemon=True)
        self._thread.start()
        if prefix:
            self._filled.put(prefix)  # hash the bytes already on disk before the new ones

    def _run(self) -> None:
        while (item := self._filled.get()) is not None:
            if isinstance(item, int):
                self._guarded(self._hash_prefix, item)
                continue
            buffer, length = item
            if length:
                self._guarded(self._update, memoryview(buffer)[:length])
            self._free.put(buffer)  # even after a failure: take() must not wait forever

    def _guarded(self, work: Callable[[Any], None], arg: Any) -> None:
        if self._error is None:
            try:
                work(arg)
            except BaseException as exc:
                self._error = exc

    def _update(self, data: memoryview) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def _hash_prefix(self, length: int) -> None:
        done = 0
        while done < length:
            block = os.pread(self._fd, min(READ_SIZE, length - done), done)
            if not block:
                raise OSError(f"partial file shorter than {length} bytes")
            self.sha256.update(block)
            done += len(block)

    def take(self) -> bytearray:
        """A buffer to fill: a free one, a new one while fewer than :data:`_BUFFERS` exist, else the
        next one the hashing thread is done with."""
        if self._error is not None:
            raise self._error
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < _BUFFERS:
                self._made += 1
                return bytearray(self._buffer_size)
        return self._free.get()

    def give(self, buffer: bytearray, length: int) -> None:
        """Hash ``buffer[:length]`` after everything given before; the buffer is then reused."""
        self._filled.put((buffer, length))

    def close(self) -> None:
        """Wait until everything given is hashed; raise the helper's error if it had one."""
        if self._thread.is_alive():
            self._filled.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


class Writer:
    """The receiving side of a transfer: exposes the free part of a buffer to receive into; each
    full buffer is written to the partial file on this thread (``os.write`` releases the GIL),
    counted, and given to the :class:`Hasher`."""

    def __init__(self, fd: int, hasher: Hasher, on_bytes: OnBytes) -> None:
        self._fd = fd
        self._hasher = hasher
        self._on_bytes = on_bytes
        self._buffer: bytearray | None = None
        self._view = memoryview(b"")
        self._filled = 0
        self.written = 0  # bytes written to the file by this writer

    @property
    def pending(self) -> int:
        """Bytes received into the current buffer, not written yet."""
        return self._filled

    def room(self) -> memoryview:
        """The free part of the current buffer (a new buffer once the last one was written)."""
        if self._buffer is None:
            self._buffer = self._hasher.take()
            self._view = memoryview(self._buffer)
        return self._view[self._filled :]

    def commit(self, count: int) -> None:
        """``count`` bytes were received into :meth:`room`; a full buffer is written out."""
        self._filled += count
        if self._filled == len(self._view):
            self.flush()

    def flush(self) -> None:
        """Write what the current buffer holds (if anything) and pass it on to be hashed."""
        buffer, length = self._buffer, self._filled
        if buffer is None:
            return
        data = self._view[:length]
        self._buffer, self._view, self._filled = None, memoryview(b""), 0
        try:
            write_all(self._fd, data)
        except BaseException:
            self._hasher.give(buffer, 0)  # the transfer fails: the buffer only goes back
            raise
        self._hasher.give(buffer, length)
        self.written += length
        if length:
            self._on_bytes(length)


def write_all(fd: int, data: memoryview) -> None:
    """Write ``data`` at ``fd``'s position, in pieces of at most :data:`_WRITE_SIZE` (``os.write``
    may also write less than asked)."""
    while data:
        data = data[os.write(fd, data[:_WRITE_SIZE]) :]
