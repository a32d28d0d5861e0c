"""The state directory: durable chunk bits, atomic swaps and state that survives a restart."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.errors import StoreError
from device.rollout import Step
from device.store import AgentState, ModelRef, Store, with_step

CS = 1024
DATA = os.urandom(5 * CS + 100)
HASHES = [hashlib.sha256(DATA[i : i + CS]).hexdigest() for i in range(0, len(DATA), CS)]
SHA = hashlib.sha256(DATA).hexdigest()


def chunk(i: int) -> bytes:
    return DATA[i * CS : (i + 1) * CS]


def test_chunks_land_at_their_offsets_and_the_file_is_whole(tmp_path: Path) -> None:
    """Chunks written out of order at their offsets make the exact file."""
    st = Store(tmp_path).open_staging(SHA, len(DATA), CS, HASHES)
    for i in (5, 2, 0, 4, 1, 3):
        st.write(i, chunk(i))
    st.close()
    assert st.book.complete
    assert st.part.read_bytes() == DATA


def test_bits_are_persisted_only_after_their_data(tmp_path: Path) -> None:
    """Before a flush the bitmap on disk claims nothing; after it, exactly the written chunks."""
    store = Store(tmp_path, fsync_every=100)
    st = store.open_staging(SHA, len(DATA), CS, HASHES)
    st.write(1, chunk(1))
    st.write(3, chunk(3))
    assert st.bitmap_path.read_bytes().strip(b"\x00") == b""
    st.flush()
    assert st.bitmap_path.read_bytes() == bytes([0b1010])
    st.close()
    again = store.open_staging(SHA, len(DATA), CS, HASHES)
    assert list(again.book.missing()) == [0, 2, 4, 5]
    again.close()


def test_resume_rehashes_claimed_chunks_and_drops_bad_ones(tmp_path: Path) -> None:
    """A bit whose bytes do not match (a lying disk) is cleared on resume, so the chunk is refetched."""
    store = Store(tmp_path)
    st = store.open_staging(SHA, len(DATA), CS, HASHES)
    for i in range(3):
        st.write(i, chunk(i))
    st.flush()
    st.close()
    with open(st.part, "r+b") as f:
        f.seek(CS + 10)
        f.write(b"\xff\xfe")
    again = store.open_staging(SHA, len(DATA), CS, HASHES)
    assert [again.book.has(i) for i in range(3)] == [True, False, True]
    assert again.bitmap_path.read_bytes()[0] == 0b101
    again.close()


def test_activate_keeps_previous_and_rollback_restores_it(tmp_path: Path) -> None:
    """Activation moves active to previous by hard link; restore_previous puts it back."""
    store = Store(tmp_path)
    store.active.write_bytes(b"old model")
    staged = store.models / "staging-x.part"
    staged.write_bytes(b"new model")
    store.activate(staged)
    assert store.active.read_bytes() == b"new model"
    assert store.previous.read_bytes() == b"old model"
    assert not staged.exists()
    store.restore_previous()
    assert store.active.read_bytes() == b"old model"


@pytest.mark.parametrize("point", ["after_write", "after_rename"])
def test_power_cut_during_swap_leaves_a_whole_active_model(tmp_path: Path, point: str) -> None:
    """SIGKILL between write and rename, or rename and directory fsync: active is old or new, whole."""
    store = Store(tmp_path)
    store.active.write_bytes(b"old" * 1000)
    staged = store.models / "x"
    staged.write_bytes(b"new" * 1000)
    code = "import sys; from device.store import Store; s = Store(sys.argv[1]); s.activate(s.models / 'x')"
    env = {**os.environ, "FLEETBUS_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=False)
    assert proc.returncode == -9
    assert store.active.read_bytes() in (b"old" * 1000, b"new" * 1000)
    assert store.previous.read_bytes() == b"old" * 1000
    # Finishing the swap after the restart is idempotent.
    if staged.exists():
        store.activate(staged)
    assert store.active.read_bytes() == b"new" * 1000


def test_state_round_trips_and_bdseq_grows(tmp_path: Path) -> None:
    """state.json restores every field; the birth/death sequence only grows."""
    store = Store(tmp_path)
    assert store.load_state() == AgentState()
    s = AgentState(
        step=Step.DOWNLOADING,
        rollout_id="r1",
        target=ModelRef("2", "ab" * 32),
        version_number=7,
        active=ModelRef("1", "cd" * 32),
    )
    store.save_state(s)
    assert Store(tmp_path).load_state() == s
    first = store.next_bdseq()
    assert [store.next_bdseq() for _ in range(2)] == [first + 1, first + 2]
    assert with_step(with_step(s, Step.DOWNLOADING, resumes=2), Step.VERIFYING).resumes == 0


def test_corrupt_state_is_reported_and_kept_aside(tmp_path: Path) -> None:
    """An unreadable state.json raises StoreError and is copied aside for a human."""
    store = Store(tmp_path)
    store.state_file.write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        store.load_state()
    assert store.state_file.with_suffix(".corrupt").exists()


def test_discard_staging_removes_part_and_bitmap(tmp_path: Path) -> None:
    """Discarding a download deletes its file and bitmap, nothing else."""
    store = Store(tmp_path)
    store.open_staging(SHA, len(DATA), CS, HASHES).close()
    store.active.write_bytes(b"keep")
    store.discard_staging(SHA)
    assert [p.name for p in store.models.iterdir()] == ["active.tflite"]


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4, 5), (5, 2, 0, 4, 1, 3), (1, 0, 3, 2)])
def test_the_file_hash_kept_while_writing_matches_the_file(tmp_path: Path, order: tuple[int, ...]) -> None:
    """The running whole-file SHA-256 equals the file's, in or out of order, complete or not."""
    st = Store(tmp_path).open_staging(SHA, len(DATA), CS, HASHES)
    for i in order:
        st.write(i, chunk(i))
        assert st.digest() == hashlib.sha256(st.part.read_bytes()).hexdigest()
    if st.book.complete:
        assert st.digest() == SHA
    st.close()


def test_a_resumed_download_hashes_the_prefix_an_earlier_process_wrote(tmp_path: Path) -> None:
    """After a restart the held prefix is read back once, so the final hash still covers every byte."""
    store = Store(tmp_path)
    st = store.open_staging(SHA, len(DATA), CS, HASHES)
    for i in (0, 1, 3):
        st.write(i, chunk(i))
    st.flush()
    st.close()
    again = store.open_staging(SHA, len(DATA), CS, HASHES)
    for i in (2, 4, 5):
        again.write(i, chunk(i))
    assert again.book.complete
    assert again.digest() == SHA
    again.close()


def test_state_without_a_reserve_loads_with_none(tmp_path: Path) -> None:
    """A state.json written before version numbers were reserved loads with a reserve of 0."""
    store = Store(tmp_path)
    store.state_file.write_text('{"step": "IDLE", "version_number": 7}')
    state = store.load_state()
    assert (state.version_number, state.version_reserved) == (7, 0)


def test_bdseq_grows_and_a_wiped_state_dir_does_not_restart_it_below_the_old_one(tmp_path: Path) -> None:
    """Each connect bumps bdseq by one; after the state directory is wiped it starts above where it was."""
    store = Store(tmp_path / "a")
    first = store.next_bdseq()
    assert store.next_bdseq() == first + 1
    assert Store(tmp_path / "a").next_bdseq() == first + 2  # survives a restart
    time.sleep(0.01)  # the re-flash happens later than the last connect
    store.bdseq_file.unlink()  # and wipes the state directory
    assert Store(tmp_path / "a").next_bdseq() > first + 2
