"""All-or-nothing updates of a file that a library rewrites in place (the HDF5 cache).

HDF5 updates its own structures (superblock, B-trees, heaps) in place and in no fixed
order, so a writer stopped in the middle of a flush (kill -9, disk full) can leave a file
that HDF5 refuses to open. The writer therefore goes through `JournaledFile` (h5py's
`fileobj` driver): between `begin()` and `end()`, bytes that existed at `begin()` are copied
to `<file>.journal` before they are first overwritten or cut off. `end()` deletes the
journal, which is the commit point. Whoever finds a journal left behind calls `roll_back`,
which puts those bytes back and cuts the file to its length at `begin()`: the file is then
byte for byte what it was after the last complete update.

A journal only ever rolls back the file it was written for: its header holds that file's
identity (the cache keeps a random id in its HDF5 user block, which HDF5 never writes). If
the file was deleted and made afresh, the ids differ and the journal is discarded, with a
warning, instead of pasting another file's bytes into it.

It guards against the process stopping (kill -9, a crash, a full disk). It does not fsync
before each overwrite, which would cost a disk flush per commit: after a power cut, the
file may be damaged, and the reader says so (`extract --rebuild`) rather than read garbage.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_MAGIC = b"BNCJRNL2"
_HEADER = struct.Struct("<8sQ32s")  # magic, the file's length at begin(), the file's identity
_MAGIC_V1, _HEADER_V1 = b"BNCJRNL1", struct.Struct("<8sQ")  # before identities: only files without one
IDENTITY_SIZE = _HEADER.size - _HEADER_V1.size
_RECORD = struct.Struct("<QQ")  # offset and length of the saved bytes that follow


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


class JournaledFile(io.FileIO):
    """The writer's handle on the file; pass it to `h5py.File` as a file object.

    A write that fails (disk full, file size limit) is not reported to HDF5, whose state does
    not survive a failed write (closing it can crash the process): it is kept in `error`, and
    every later write is dropped until the caller rolls the file back.
    """

    def __init__(self, path: Path, identity: bytes = b""):
        super().__init__(path, "r+")
        self.path = Path(path)
        self.identity = _checked_identity(identity)
        self.error: BaseException | None = None
        self._journal: io.FileIO | None = None
        self._length = 0  # the file's length at begin()
        self._saved: list[tuple[int, int]] = []  # byte ranges already in the journal

    def begin(self) -> None:
        """Start an update; the journal is written before any byte can change."""
        self._length = os.fstat(self.fileno()).st_size
        self._saved = []
        try:
            self._journal = io.FileIO(journal_path(self.path), "w")
            _write_all(self._journal, _HEADER.pack(_MAGIC, self._length, self.identity))
        except OSError as exc:  # no journal, no update: its writes are dropped like after any failed write
            self.error = exc

    def end(self) -> None:
        """The update is complete: deleting the journal commits it."""
        self._journal.close()
        self._journal = None
        os.unlink(journal_path(self.path))

    def abandon(self) -> None:
        """Drop every further write (HDF5 still flushes on close) until `roll_back` restores the file."""
        if self.error is None:
            self.error = OSError("update abandoned")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        start = self.tell()
        if self.error is None:
            try:
                self._save(start, start + len(view))
                _write_all(super(), view)
            except BaseException as exc:  # also KeyboardInterrupt: HDF5 must not see it mid-write
                self.error = exc
        self.seek(start + len(view))
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        if self.error is None:
            try:
                self._save(size, self._length)
                super().truncate(size)
            except BaseException as exc:
                self.error = exc
        return size

    def _save(self, start: int, end: int) -> None:
        """Copy the old bytes of [start, end) that the journal does not hold yet."""
        if self._journal is None:
            raise OSError(f"{self.path} written outside an update")
        for low, high in _uncovered(self._saved, start, min(end, self._length)):
            old = os.pread(self.fileno(), high - low, low)
            _write_all(self._journal, _RECORD.pack(low, len(old)) + old)
            self._saved.append((low, high))


def roll_back(path: Path, identity: bytes = b"") -> None:
    """Undo an update that did not reach `end()`, if there is one. `identity` is the file's
    identity now; a journal written for another file is discarded with a warning."""
    journal = journal_path(path)
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return
    header = _header(journal, data)
    if header is not None:  # else it was cut off before the file was touched
        position, length, written_for = header
        if written_for != _checked_identity(identity):
            log.warning("%s was left by an unfinished update of another file, since deleted or replaced; it is "
                        "discarded, and %s is left as it is", journal, path.name)
            journal.unlink()
            return
        with open(path, "r+b") as target:
            target.truncate(length)
            while position + _RECORD.size <= len(data):
                offset, size = _RECORD.unpack_from(data, position)
                position += _RECORD.size
                if position + size > len(data):
                    break  # cut off while being saved: the overwrite it guards never started
                target.seek(offset)
                target.write(data[position:position + size])
                position += size
            target.flush()
            os.fsync(target.fileno())
    journal.unlink()


def _header(journal: Path, data: bytes) -> tuple[int, int, bytes] | None:
    """(header size, the file's length at begin(), the identity of the file it was written for),
    or None for a journal cut off inside its header."""
    for magic, header in ((_MAGIC, _HEADER), (_MAGIC_V1, _HEADER_V1)):
        if data.startswith(magic):
            if len(data) < header.size:
                return None
            _, length, *written_for = header.unpack_from(data)
            return header.size, length, written_for[0] if written_for else bytes(IDENTITY_SIZE)
    if len(data) < _HEADER_V1.size:
        return None
    raise OSError(f"{journal} is not a journal written by this tool")


def _checked_identity(identity: bytes) -> bytes:
    if len(identity) > IDENTITY_SIZE:
        raise ValueError(f"a file identity holds at most {IDENTITY_SIZE} bytes, got {len(identity)}")
    return identity.ljust(IDENTITY_SIZE, b"\0")


def _uncovered(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) outside every range in `ranges`."""
    parts = [(start, end)] if start < end else []
    for low, high in ranges:
        parts = [piece for a, b in parts for piece in ((a, min(b, low)), (max(a, high), b)) if piece[0] < piece[1]]
    return parts


def _write_all(handle, data) -> None:
    """Every write to the file or its journal goes through here (a short write is resumed)."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]
