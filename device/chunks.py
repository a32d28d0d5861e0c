"""Chunk bookkeeping for one model file: the bitmap, what is missing, and whether a chunk is good.

Pure: no files, no sockets.  The bitmap uses the wire order of docs/protocol.md (bit *i* is byte
``i // 8``, mask ``1 << (i % 8)``) so it goes on the wire and to disk unchanged.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterator, Sequence


class Outcome(str, enum.Enum):
    """What happened to one received chunk."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    OUT_OF_RANGE = "out_of_range"
    WRONG_SIZE = "wrong_size"
    BAD_HASH = "bad_hash"

    @property
    def rejected(self) -> bool:
        return self in (Outcome.OUT_OF_RANGE, Outcome.WRONG_SIZE, Outcome.BAD_HASH)


def bitmap_len(count: int) -> int:
    return (count + 7) // 8


def bit_is_set(bitmap: bytes | bytearray, index: int) -> bool:
    return bool(bitmap[index // 8] & (1 << (index % 8)))


def set_bit(bitmap: bytearray, index: int) -> None:
    bitmap[index // 8] |= 1 << (index % 8)


def clear_bit(bitmap: bytearray, index: int) -> None:
    bitmap[index // 8] &= ~(1 << (index % 8)) & 0xFF


class ChunkBook:
    """Which chunks of a file are held, and the checks a chunk must pass to be kept."""

    def __init__(self, size: int, chunk_size: int, chunk_sha256: Sequence[str], bitmap: bytes | None = None):
        if size < 1 or chunk_size < 1:
            raise ValueError("size and chunk_size must be positive")
        expected = (size + chunk_size - 1) // chunk_size
        if len(chunk_sha256) != expected:
            raise ValueError(
                f"{size} bytes in chunks of {chunk_size} make {expected} chunks, "
                f"but {len(chunk_sha256)} chunk hashes were given"
            )
        self.size = size
        self.chunk_size = chunk_size
        self.hashes = list(chunk_sha256)
        self.count = expected
        self._bitmap = bytearray(bitmap_len(expected))
        self._held = 0
        if bitmap is not None:
            for i in range(min(len(bitmap) * 8, expected)):
                if bit_is_set(bitmap, i):
                    set_bit(self._bitmap, i)
                    self._held += 1

    # --- queries ---

    @property
    def bitmap(self) -> bytes:
        return bytes(self._bitmap)

    @property
    def held(self) -> int:
        return self._held

    @property
    def complete(self) -> bool:
        return self._held == self.count

    @property
    def percent(self) -> int:
        return (100 * self._held) // self.count

    def has(self, index: int) -> bool:
        return 0 <= index < self.count and bit_is_set(self._bitmap, index)

    def length_of(self, index: int) -> int:
        """Bytes chunk ``index`` must have: ``chunk_size`` except for a shorter last chunk."""
        if index == self.count - 1:
            return self.size - self.chunk_size * (self.count - 1)
        return self.chunk_size

    def offset_of(self, index: int) -> int:
        return index * self.chunk_size

    def missing(self) -> Iterator[int]:
        """Indexes not yet held, in order."""
        for i in range(self.count):
            if not bit_is_set(self._bitmap, i):
                yield i

    def next_window(self, window: int, exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """Up to ``window`` missing indexes, skipping those in ``exclude`` (already asked for)."""
        out: list[int] = []
        for i in self.missing():
            if i in exclude:
                continue
            out.append(i)
            if len(out) >= window:
                break
        return out

    # --- updates ---

    def check(self, index: int, data: bytes) -> Outcome:
        """Classify a chunk without changing anything."""
        if not 0 <= index < self.count:
            return Outcome.OUT_OF_RANGE
        if bit_is_set(self._bitmap, index):
            return Outcome.DUPLICATE
        if len(data) != self.length_of(index):
            return Outcome.WRONG_SIZE
        if hashlib.sha256(data).hexdigest() != self.hashes[index]:
            return Outcome.BAD_HASH
        return Outcome.STORED

    def mark(self, index: int) -> None:
        """Record chunk ``index`` as held; call only once its bytes are written."""
        if not bit_is_set(self._bitmap, index):
            set_bit(self._bitmap, index)
            self._held += 1

    def unmark(self, index: int) -> None:
        """Forget chunk ``index`` (its bytes on disk turned out not to match)."""
        if bit_is_set(self._bitmap, index):
            clear_bit(self._bitmap, index)
            self._held -= 1

    def accept(self, index: int, data: bytes) -> Outcome:
        """Check a chunk and, if it is good and new, mark it held."""
        outcome = self.check(index, data)
        if outcome is Outcome.STORED:
            self.mark(index)
        return outcome
