"""Chunk bookkeeping: the bitmap's bit order, what is missing, and every way a chunk is refused."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.chunks import ChunkBook, Outcome, bit_is_set, bitmap_len

DATA = bytes(range(256)) * 41  # 10,496 bytes: 2 full chunks of 4096 and a short last one


def book(data: bytes = DATA, chunk_size: int = 4096, bitmap: bytes | None = None) -> ChunkBook:
    hashes = [hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
    return ChunkBook(len(data), chunk_size, hashes, bitmap)


def piece(i: int, chunk_size: int = 4096) -> bytes:
    return DATA[i * chunk_size : (i + 1) * chunk_size]


def test_bit_order_matches_the_protocol() -> None:
    """Bit i lives in byte i // 8 under mask 1 << (i % 8), as docs/protocol.md says."""
    data = bytes(9 * 1024)
    b = book(data, 1024)
    for i in (0, 3, 8):
        assert b.accept(i, data[i * 1024 : (i + 1) * 1024]) is Outcome.STORED
    assert b.bitmap == bytes([0b0000_1001, 0b0000_0001])
    assert bitmap_len(9) == 2


def test_accept_classifies_every_outcome() -> None:
    """Good, duplicate, out-of-range, wrong-size and bad-hash chunks each get their own outcome."""
    b = book()
    assert b.accept(0, piece(0)) is Outcome.STORED
    assert b.accept(0, piece(0)) is Outcome.DUPLICATE
    assert b.accept(3, piece(0)) is Outcome.OUT_OF_RANGE
    assert b.accept(-1, piece(0)) is Outcome.OUT_OF_RANGE
    assert b.accept(1, piece(1)[:-1]) is Outcome.WRONG_SIZE
    assert b.accept(2, b"\xff" + piece(2)[1:]) is Outcome.BAD_HASH
    assert b.accept(2, piece(2)) is Outcome.STORED
    assert b.held == 2
    assert [o.rejected for o in Outcome] == [False, False, True, True, True]


def test_short_last_chunk_and_completion() -> None:
    """The last chunk is the remainder; the book is complete when every bit is set."""
    b = book()
    assert b.length_of(2) == len(DATA) - 2 * 4096
    for i in (2, 0, 1):
        b.accept(i, piece(i))
    assert b.complete
    assert b.percent == 100
    assert list(b.missing()) == []


def test_next_window_skips_held_and_excluded() -> None:
    """A window lists missing chunks in order, leaving out ones already asked for."""
    data = bytes(10 * 1024)
    b = book(data, 1024)
    b.accept(1, data[1024:2048])
    assert b.next_window(3) == [0, 2, 3]
    assert b.next_window(3, exclude={0, 2}) == [3, 4, 5]


def test_resume_from_a_saved_bitmap() -> None:
    """A book built from a persisted bitmap holds exactly those chunks; stray high bits are ignored."""
    b = book(bitmap=bytes([0b1111_1010]))
    assert [b.has(i) for i in range(3)] == [False, True, False]
    assert b.held == 1
    b.unmark(1)
    assert b.held == 0


def test_hash_count_must_match_the_size() -> None:
    """A manifest whose chunk list disagrees with its size is refused up front."""
    with pytest.raises(ValueError, match="chunk hashes"):
        ChunkBook(10_000, 4096, ["0" * 64])


@given(st.sets(st.integers(0, 199)))
def test_bitmap_round_trips_any_set_of_chunks(held: set[int]) -> None:
    """Hypothesis: marking any set of chunks gives a bitmap that reads back as exactly that set."""
    b = ChunkBook(200 * 1024, 1024, ["0" * 64] * 200)
    for i in held:
        b.mark(i)
    again = ChunkBook(200 * 1024, 1024, ["0" * 64] * 200, b.bitmap)
    assert {i for i in range(200) if bit_is_set(again.bitmap, i)} == held
    assert set(again.missing()) == set(range(200)) - held
