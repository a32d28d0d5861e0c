"""What the agent keeps on disk: model slots, the staging file and its bitmap, and state.json.

    STATE_DIR/
      state.json                  the persisted `AgentState` (written atomically)
      bdseq                       birth/death sequence, bumped on every connect
      deploy.bin                  the signed deploy being worked on, to resume after a crash
      models/active.tflite        the model that serves
      models/previous.tflite      the last good model, for rollback
      models/staging-SHA.part     the download, preallocated and written at each chunk's offset
      models/staging-SHA.bitmap   chunks held, in the wire bit order

Durability rules:
- A chunk's bytes reach the disk (fdatasync: the file is preallocated, so no metadata a read
  needs changes) before its bit is persisted, so a crash can lose bits but never claim a chunk
  that was not written.  Bits only ever get set, so a torn bitmap write is a
  mix of old and new bytes and still claims only written chunks.  On resume every claimed chunk is
  rehashed anyway, so even a disk that lies about fsync costs a refetch, never a bad model.
- Swaps are temp file, fsync, rename, fsync of the directory.  ``previous`` is made as a hard link
  of ``active`` first, so ``active`` always names a complete model.  A power cut at any instant
  leaves either the old or the new model in ``active``.

FLEETBUS_CRASH_AT names a crash point (``after_write``: staged file synced, not yet renamed;
``after_rename``: renamed, directory not yet synced) at which the process kills itself with
SIGKILL, so tests can cut the power at that instant with a real process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device.chunks import ChunkBook, Outcome
from device.errors import StoreError
from device.rollout import Step

CRASH_ENV = "FLEETBUS_CRASH_AT"
_READ_BLOCK = 1 << 20


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if $FLEETBUS_CRASH_AT names this point (tests only)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new bytes, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelRef:
    version: str
    sha256: str


@dataclass(frozen=True)
class AgentState:
    """Everything the agent must remember across a restart (state.json)."""

    step: Step = Step.IDLE
    rollout_id: str | None = None
    target: ModelRef | None = None  # the model the rollout brings
    manifest_ts: float = 0.0
    started_at: float = 0.0  # wall clock when the rollout was accepted: its timeout runs from here
    version_number: int = 0  # of the last step's State report; only grows
    # Numbers below this one may have gone out on progress reports, which are not persisted one by
    # one (a step is): a restarted agent repeats its last step under this number, then counts on.
    version_reserved: int = 0
    resumes: int = 0  # restarts that found the rollout in `step`
    reason: str | None = None
    rolled_back: bool = False
    watching: bool = False  # the watchdog has not yet cleared the active model
    active: ModelRef | None = None
    previous: ModelRef | None = None

    def to_json(self) -> bytes:
        # Field by field: dataclasses.asdict deep-copies every value (18 µs a state here, against 5).
        data: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["step"] = self.step.value
        for key in ("target", "active", "previous"):
            ref = data[key]
            if ref is not None:
                data[key] = {"version": ref.version, "sha256": ref.sha256}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AgentState:
        data: dict[str, Any] = json.loads(raw)
        for key in ("target", "active", "previous"):
            if data.get(key) is not None:
                data[key] = ModelRef(**data[key])
        data["step"] = Step(data.get("step", "IDLE"))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Staging:
    """A download in progress: the preallocated file, its bitmap, and chunks awaiting fsync.

    It also hashes the file as it is written: chunks extend a running SHA-256 of the file's held
    prefix (one arriving ahead of the prefix is read back when the gap before it fills), so the
    whole-file check at the end costs nothing when the chunks came in order, instead of reading
    the whole file again at the tail of every delivery.
    """

    part: Path
    bitmap_path: Path
    book: ChunkBook
    fsync_every: int = 8
    _fd: int = -1
    _bitmap_fd: int = -1
    _pending: list[int] = field(default_factory=list)
    _hasher: Any = field(default_factory=hashlib.sha256)
    _hashed: int = 0  # chunks 0.._hashed-1 are in _hasher

    def open(self) -> None:
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        self._bitmap_fd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != self.book.size:
            os.ftruncate(self._fd, self.book.size)
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fallocate(self._fd, 0, self.book.size)

    def write(self, index: int, data: bytes) -> Outcome:
        """Check a chunk; if good and new, write it at its offset and mark it held in memory."""
        outcome = self.book.check(index, data)
        if outcome is not Outcome.STORED:
            return outcome
        os.pwrite(self._fd, data, self.book.offset_of(index))
        self.book.mark(index)
        self._pending.append(index)
        if index == self._hashed:
            self._hasher.update(data)
            self._hashed += 1
            self._extend_hash()
        if self.book.complete:
            self.flush(sync_bits=False)
        elif len(self._pending) >= self.fsync_every:
            self.flush()
        return outcome

    def _extend_hash(self) -> None:
        # Chunks that arrived ahead of the prefix are on disk (in the page cache): read them back.
        book = self.book
        while self._hashed < book.count and book.has(self._hashed):
            i = self._hashed
            self._hasher.update(os.pread(self._fd, book.length_of(i), book.offset_of(i)))
            self._hashed += 1

    def digest(self) -> str:
        """SHA-256 of the whole file; the prefix hashed while writing is not read again."""
        hasher = self._hasher.copy()
        offset = self._hashed * self.book.chunk_size
        while offset < self.book.size:
            block = os.pread(self._fd, min(_READ_BLOCK, self.book.size - offset), offset)
            if not block:
                break
            hasher.update(block)
            offset += len(block)
        return str(hasher.hexdigest())

    def flush(self, sync_bits: bool = True) -> None:
        """Make written chunks durable, then persist the bits that claim them.

        ``sync_bits=False`` (the file is complete) writes the bits without waiting for them to reach
        the disk: they can only lag the data, never claim more, so a power cut before GATING is
        saved costs at most a refetch of the last batch, and a killed process loses nothing.
        """
        if not self._pending:
            return
        os.fdatasync(self._fd)
        os.pwrite(self._bitmap_fd, self.book.bitmap, 0)
        if sync_bits:
            os.fdatasync(self._bitmap_fd)
        self._pending.clear()

    def close(self) -> None:
        for attr in ("_fd", "_bitmap_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)


class Store:
    """The state directory."""

    def __init__(self, root: str | os.PathLike[str], fsync_every: int = 8):
        self.root = Path(root)
        self.models = self.root / "models"
        self.fsync_every = fsync_every
        try:
            self.models.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {self.root}: {exc.strerror}") from None
        self.state_file = self.root / "state.json"
        self.bdseq_file = self.root / "bdseq"
        self.deploy_file = self.root / "deploy.bin"
        self.active = self.models / "active.tflite"
        self.previous = self.models / "previous.tflite"

    # --- agent state ---

    def load_state(self) -> AgentState:
        try:
            return AgentState.from_json(self.state_file.read_bytes())
        except FileNotFoundError:
            return AgentState()
        except (ValueError, TypeError, KeyError) as exc:
            # state.json is written atomically, so this is outside damage; start clean but keep a copy.
            import shutil  # only here and in _link_or_copy: with bz2 and lzma, 0.3-0.4 MiB of RSS

            with contextlib.suppress(OSError):
                shutil.copy(self.state_file, self.state_file.with_suffix(".corrupt"))
            raise StoreError(f"{self.state_file} is unreadable ({exc}); moved aside") from None

    def save_state(self, state: AgentState) -> None:
        atomic_write(self.state_file, state.to_json())

    def next_bdseq(self) -> int:
        """Bump and persist the birth/death sequence; called before every connect.

        Without a sequence on disk (a first boot, or a state directory wiped by a re-flash) it starts
        at the wall clock in milliseconds, not at 0: the fleet remembers the last bdseq it saw from
        this device id and takes a lower one for an older session (Sparkplug's rule), so a wiped
        device starting at 0 would stay "offline" until it had reconnected as often as before.
        """
        try:
            current = int(self.bdseq_file.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            current = int(time.time() * 1000) - 1
        nxt = max(current + 1, 0)
        atomic_write(self.bdseq_file, f"{nxt}\n".encode())
        return nxt

    def save_deploy(self, payload: bytes) -> None:
        atomic_write(self.deploy_file, payload)

    def load_deploy(self) -> bytes | None:
        try:
            return self.deploy_file.read_bytes()
        except FileNotFoundError:
            return None

    # --- staging ---

    def staging_paths(self, sha256: str) -> tuple[Path, Path]:
        return self.models / f"staging-{sha256}.part", self.models / f"staging-{sha256}.bitmap"

    def open_staging(self, sha256: str, size: int, chunk_size: int, chunk_sha256: list[str]) -> Staging:
        """Open (or resume) the download of one file; claimed chunks are rehashed before trust."""
        part, bitmap_path = self.staging_paths(sha256)
        saved: bytes | None = None
        if part.exists() and bitmap_path.exists():
            saved = bitmap_path.read_bytes()
        book = ChunkBook(size, chunk_size, chunk_sha256, saved)
        staging = Staging(part, bitmap_path, book, self.fsync_every)
        staging.open()
        if book.held:
            self._recheck(staging)
            staging._extend_hash()  # the held prefix was written by an earlier process
        return staging

    def _recheck(self, staging: Staging) -> None:
        book = staging.book
        dropped = False
        with open(staging.part, "rb") as f:
            for i in range(book.count):
                if not book.has(i):
                    continue
                f.seek(book.offset_of(i))
                data = f.read(book.length_of(i))
                if hashlib.sha256(data).hexdigest() != book.hashes[i]:
                    book.unmark(i)
                    dropped = True
        if dropped:
            os.pwrite(staging._bitmap_fd, book.bitmap, 0)
            os.fsync(staging._bitmap_fd)

    def discard_staging(self, sha256: str | None = None) -> None:
        """Delete one staging file and its bitmap, or every one when ``sha256`` is None."""
        pattern = f"staging-{sha256}.*" if sha256 else "staging-*"
        for p in self.models.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # --- slots ---

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        tmp = dst.with_name(dst.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # a filesystem without hard links (FAT on some boards): copy and sync
            import shutil

            shutil.copyfile(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dst)

    def activate(self, staged: Path) -> None:
        """Make ``staged`` the active model and the old active one ``previous``; idempotent."""
        if self.active.exists():
            self._link_or_copy(self.active, self.previous)
            fsync_dir(self.models)
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("after_write")
        os.replace(staged, self.active)
        crash_point("after_rename")
        fsync_dir(self.models)

    def restore_previous(self) -> None:
        """Put the previous model back in the active slot (rollback)."""
        if not self.previous.exists():
            raise StoreError("there is no previous model to roll back to")
        self._link_or_copy(self.previous, self.active)
        fsync_dir(self.models)

    def active_sha256(self) -> str | None:
        try:
            return sha256_file(self.active)
        except FileNotFoundError:
            return None

    def disk_free(self) -> int:
        try:
            st = os.statvfs(self.root)  # what shutil.disk_usage(...).free computes
            return st.f_bavail * st.f_frsize
        except OSError:
            return 0


def with_step(state: AgentState, step: Step, **changes: Any) -> AgentState:
    """A copy of ``state`` in ``step``; the resume counter restarts when the step changes."""
    resumes = state.resumes if step is state.step else 0
    return replace(state, step=step, resumes=changes.pop("resumes", resumes), **changes)
