"""The check journal: an append-only, fsync'd log that is a check's commit point.

A check's writes (its audited verdicts, the handoffs they open or join, the vectors the model
made) cost a DuckDB transaction of ~3-4 ms of CPU, more than everything else a cache-hit check
does. So they are appended here instead: one line per check, made durable with ``fdatasync``
(~0.2 ms) before the answer is sent, then applied to DuckDB in batches behind it (see
:class:`kb.Store`). A line is ``<seq> <crc32> <json>\\n``; the DuckDB table ``journal_state``
records the last sequence number applied, in the same transaction as the rows, so replaying
the journal after a crash applies every acknowledged line exactly once.

A line that is torn (a crash while writing it) or fails its checksum was never acknowledged:
reading stops there.

The file is written ahead with zeros and lines overwrite them, and emptying it only rewinds to
the start: an append then changes no file size, so ``fdatasync`` writes the line's pages and
none of the file system's metadata (about half the time of an append that grows the file, and
it no longer queues behind DuckDB's own syncs). What lies past the last line (zeros, or the
tail of lines from before a rewind, all of them applied) is never read: reading stops at the
first line that is torn, corrupt or numbered lower than the line before it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Journal", "Op", "decode_matrix", "encode_matrix"]

log = logging.getLogger(__name__)

#: One deferred write: its kind (a key of ``Store._APPLY``) and JSON-able data.
Op = tuple[str, Any]


def encode_matrix(matrix: npt.NDArray[np.float32]) -> dict[str, Any]:
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    return {"shape": list(m.shape), "f32": base64.b64encode(m.tobytes()).decode("ascii")}


def decode_matrix(data: dict[str, Any]) -> npt.NDArray[np.float32]:
    raw = base64.b64decode(data["f32"])
    return np.frombuffer(raw, dtype=np.float32).reshape(data["shape"]).copy()


#: Bytes written ahead at a time (the file keeps the largest size a burst of checks needed).
CHUNK = 1 << 20


class Journal:
    """A file of numbered, checksummed groups of writes, appended in order from its start.

    Open one on an existing file to :meth:`read` it, then :meth:`reset` it before appending.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._end = 0  # where the next group goes
        self._size = os.fstat(self._fd).st_size

    def read(self) -> Iterator[tuple[int, list[Op]]]:
        """Every intact group, oldest first; stops at the first torn or corrupt line, or at one
        numbered lower than the line before it (left from before a rewind)."""
        last = 0
        with self.path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if line[:1] == b"\0":
                    return  # written ahead, never used
                group = _parse(line)
                if group is None or group[0] <= last:
                    if group is None:
                        log.warning("journal %s: line %d is torn or corrupt; it and any after "
                                    "it were never acknowledged", self.path, number)
                    return
                last = group[0]
                yield group

    def append(self, seq: int, ops: list[Op]) -> None:
        """Write one group and make it durable before returning."""
        payload = json.dumps(ops, separators=(",", ":"), default=_default).encode()
        line = b"%d %08x %s\n" % (seq, zlib.crc32(payload), payload)
        with self._lock:
            if self._end + len(line) > self._size:
                self._grow(self._end + len(line))
            view, at = memoryview(line), self._end
            while view:
                n = os.pwrite(self._fd, view, at)
                view, at = view[n:], at + n
            os.fdatasync(self._fd)
            self._end = at

    def _grow(self, need: int) -> None:
        """Write zeros ahead to at least ``need`` bytes, and make the new size durable."""
        size = max(-(-need // CHUNK) * CHUNK, 2 * self._size)
        zeros = bytes(min(CHUNK, size - self._size))
        at = self._size
        while at < size:
            at += os.pwrite(self._fd, zeros[: size - at], at)
        os.fsync(self._fd)
        self._size = size

    def reset(self) -> None:
        """Empty the file once every group in it is applied: the next group goes at its start.
        Not fsync'd on purpose: groups that reappear after a crash are skipped by their
        sequence numbers."""
        with self._lock:
            self._end = 0
            if self._size:
                # Reading stops at once, even before the next group overwrites the first.
                os.pwrite(self._fd, b"\0", 0)
            else:
                self._grow(CHUNK)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _parse(line: bytes) -> tuple[int, list[Op]] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        seq_s, crc_s, payload = line[:-1].split(b" ", 2)
        if zlib.crc32(payload) != int(crc_s, 16):
            return None
        ops = json.loads(payload)
        return int(seq_s), [(str(kind), data) for kind, data in ops]
    except ValueError:
        return None


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
