"""The principal registry: who may connect to the broker, in which role, with which groups.

One JSON file holds every principal (devices, operators, readers). Passwords are generated here with
``secrets`` and handed out once; the file keeps two hashes of each, never the password:

* an argon2id hash (argon2-cffi ``PasswordHasher``, OWASP's profile) that the embedded broker verifies;
* a PBKDF2-SHA512 hash in Mosquitto's ``$7$`` format, so ``fleetbus broker export-mosquitto`` can write
  a Mosquitto password file without rotating every credential (argon2 cannot be converted).

Writers take an ``flock`` on ``<file>.lock``, re-read the file, change it and replace it atomically
(temp file, fsync, rename, fsync of the directory), so two CLI invocations never lose each other's
changes and a broker never reads half a file. Readers notice changes by the file's (mtime, size, inode)
and reload; that is how a ``fleetbus device revoke`` in another process reaches a running broker.

Argon2 is deliberately slow (~20 ms and 19 MiB per check). A reconnect storm of 5,000 devices
would cost minutes of CPU, so successful checks are cached in memory for the life of the process,
keyed by (id, HMAC-SHA256 of the password under a per-process key); a hit is only honoured while the
principal's stored hash is the one that was checked and it is not revoked, so rotate and revoke take
effect on the next connect.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import argon2
import structlog

from broker.errors import (
    InvalidPrincipal,
    PrincipalExists,
    RegistryFileError,
    UnknownPrincipal,
)
from schemas.errors import TopicError
from schemas.topics import validate_id

log = structlog.get_logger("fleetbus.broker.registry")

REGISTRY_ENV = "FLEETBUS_REGISTRY"
DEFAULT_REGISTRY_NAME = "fleetbus-registry.json"
FORMAT_NAME = "fleetbus-registry"
FORMAT_VERSION = 1

# 24 random bytes: 192 bits, far beyond guessing, so neither hash needs to slow down an offline attack
# on a weak password; the hashes only keep the file from being a list of credentials.
PASSWORD_BYTES = 24
# Mosquitto's own default (mosquitto_passwd 2.0). Mosquitto checks passwords on its single thread, and
# with generated 192-bit passwords more rounds would cost reconnect storms and buy nothing.
MOSQUITTO_PBKDF2_ITERATIONS = 101
MOSQUITTO_SALT_BYTES = 12  # what mosquitto_passwd uses
# OWASP's argon2id profile (19 MiB, 2 passes, 1 lane) rather than argon2-cffi's default (64 MiB, 3
# passes, 4 lanes): against a generated 192-bit password both are far beyond any attack, but after a
# broker restart every device pays one check, and this profile is ~7x cheaper (21 ms vs 150-240 ms
# here), so 5,000 devices reconnecting cost minutes of CPU, not a quarter of an hour.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_PARALLELISM = 1


def default_hasher() -> argon2.PasswordHasher:
    """The argon2id parameters new hashes get; verification uses whatever a stored hash says."""
    return argon2.PasswordHasher(
        time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM
    )


_CACHE_LIMIT = 100_000


class Role(str, enum.Enum):
    """What a principal is for; broker/acl.py derives its topic rights from this."""

    DEVICE = "device"
    OPERATOR = "operator"
    READER = "reader"


@dataclass(frozen=True)
class Principal:
    """One registered identity. Hashes only: the password itself is never kept."""

    id: str
    role: Role
    groups: tuple[str, ...] = ()
    password_hash: str = field(default="", repr=False)
    mosquitto_hash: str = field(default="", repr=False)
    revoked: bool = False
    created: float = 0.0
    rotated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role.value,
            "groups": list(self.groups),
            "argon2": self.password_hash,
            "pbkdf2_sha512": self.mosquitto_hash,
            "revoked": self.revoked,
            "created": self.created,
            "rotated": self.rotated,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Principal:
        if not isinstance(raw, dict):
            raise RegistryFileError(f"registry entry {raw!r} is not an object")
        try:
            return cls(
                id=_check_id(str(raw["id"])),
                role=_check_role(str(raw["role"])),
                groups=_check_groups(raw.get("groups", [])),
                password_hash=str(raw["argon2"]),
                mosquitto_hash=str(raw.get("pbkdf2_sha512", "")),
                revoked=bool(raw.get("revoked", False)),
                created=float(raw.get("created", 0.0)),
                rotated=float(raw.get("rotated", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryFileError(f"registry entry for {raw.get('id')!r} is malformed: {exc}") from None


def default_registry_path() -> Path:
    """``$FLEETBUS_REGISTRY`` if set, else ``./fleetbus-registry.json``."""
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY_NAME)


def generate_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_PBKDF2_ITERATIONS
) -> str:
    """Hash ``password`` the way ``mosquitto_passwd -H sha512-pbkdf2`` does: ``$7$iter$salt$hash``."""
    salt = salt if salt is not None else secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def verify_mosquitto_hash(password: str, encoded: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (tests use it to prove the format round-trips)."""
    try:
        _, seven, iterations, salt, derived = encoded.split("$")
        if seven != "7":
            return False
        expected = base64.b64decode(derived)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations), 64)
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


def _check_id(value: str, what: str = "principal id") -> str:
    try:
        return validate_id(value, what)
    except TopicError as exc:
        raise InvalidPrincipal(str(exc)) from None


def _check_role(value: str | Role) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise InvalidPrincipal(f"role {value!r} is not one of {roles}") from None


def _check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    if isinstance(groups, str):
        raise InvalidPrincipal("groups must be a list of names, not one string")
    return tuple(sorted({_check_id(str(g), "group") for g in groups}))


_FileKey = tuple[int, int, int]


class Registry:
    """The registry file and an in-memory view of it that follows changes made by other processes."""

    def __init__(self, path: Path, hasher: argon2.PasswordHasher | None = None) -> None:
        self.path = Path(path)
        self._hasher = hasher or default_hasher()
        self._principals: dict[str, Principal] = {}
        self._file_key: _FileKey | None = None
        self._cache: dict[tuple[str, bytes], str] = {}
        self._cache_key = secrets.token_bytes(32)
        self._cache_lock = threading.Lock()
        self._dummy_hash: str | None = None
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def load(cls, path: Path | str, hasher: argon2.PasswordHasher | None = None) -> Registry:
        """Open the registry at ``path``; a missing file is an empty registry until the first add."""
        registry = cls(Path(path), hasher)
        registry.reload_if_changed()
        return registry

    # --- reading ------------------------------------------------------------------------------------

    def _stat_key(self) -> _FileKey | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryFileError(f"cannot stat registry {self.path}: {exc}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since the last read; True when it did."""
        key = self._stat_key()
        if key == self._file_key:
            return False
        self._principals = self._read() if key is not None else {}
        self._file_key = key
        return True

    def _read(self) -> dict[str, Principal]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryFileError(f"cannot read registry {self.path}: {exc}") from None
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise RegistryFileError(f"registry {self.path} is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise RegistryFileError(f'{self.path} is not a fleetbus registry (no "format": "{FORMAT_NAME}")')
        version = raw.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RegistryFileError(
                f"registry {self.path} has format version {version!r}; this fleetbus reads up to "
                f"{FORMAT_VERSION}: upgrade fleetbus"
            )
        principals = [Principal.from_json(p) for p in raw.get("principals", [])]
        return {p.id: p for p in principals}

    def find(self, principal_id: str) -> Principal | None:
        """The principal with this id as last read (no password check), or None."""
        return self._principals.get(principal_id)

    def get(self, principal_id: str) -> Principal:
        principal = self._principals.get(principal_id)
        if principal is None:
            raise UnknownPrincipal(f"no principal {principal_id!r} in {self.path}")
        return principal

    def list(self) -> list[Principal]:
        """Every principal, revoked ones included, sorted by id."""
        return [self._principals[k] for k in sorted(self._principals)]

    def __len__(self) -> int:
        return len(self._principals)

    # --- verifying ----------------------------------------------------------------------------------

    def verify(self, principal_id: str, password: str) -> Principal | None:
        """The principal if ``password`` is its current one and it is not revoked, else None.

        Safe to call from worker threads: argon2-cffi releases the GIL while hashing. If the file has
        become unreadable (a bad hand edit), the last good copy keeps serving, with a warning.
        """
        try:
            self.reload_if_changed()
        except RegistryFileError as exc:
            log.warning("registry_unreadable", error=str(exc), keeping="the last good copy")
        principal = self._principals.get(principal_id)
        digest = hmac.new(self._cache_key, password.encode(), hashlib.sha256).digest()
        cache_key = (principal_id, digest)
        if principal is not None:
            with self._cache_lock:
                cached = self._cache.get(cache_key)
            if cached is not None and cached == principal.password_hash:
                self.cache_hits += 1
                return None if principal.revoked else principal
        self.cache_misses += 1
        if principal is not None:
            stored = principal.password_hash
        else:
            # An unknown id costs as much as a wrong password, so response times do not reveal ids.
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(generate_password())
            stored = self._dummy_hash
        ok: bool
        try:
            ok = self._hasher.verify(stored, password)
        except argon2.exceptions.VerificationError:
            ok = False
        except argon2.exceptions.InvalidHashError:
            log.warning("registry_bad_hash", principal=principal_id, path=str(self.path))
            ok = False
        if not ok or principal is None:
            return None
        with self._cache_lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[cache_key] = stored
        return None if principal.revoked else principal

    # --- writing ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Principal]]:
        """Lock the file, yield a fresh copy of its principals, and write them back atomically."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RegistryFileError(f"cannot lock registry {self.path}: {exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            principals = self._read()
            yield principals
            self._write(principals)
            self._principals = principals
            self._file_key = self._stat_key()
        finally:
            os.close(lock_fd)  # closing drops the flock

    def _write(self, principals: dict[str, Principal]) -> None:
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "principals": [principals[k].to_json() for k in sorted(principals)],
        }
        data = json.dumps(doc, indent=2).encode() + b"\n"
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)  # hashes are not secrets, but there is no reason to share them
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise RegistryFileError(f"cannot write registry {self.path}: {exc}") from None

    def _new_secret(self) -> tuple[str, str, str]:
        password = generate_password()
        return password, self._hasher.hash(password), mosquitto_hash(password)

    def add(self, principal_id: str, role: Role | str = Role.DEVICE, groups: Iterable[str] = ()) -> str:
        """Register a principal and return its password; this is the only time it is visible."""
        return self.add_many([(principal_id, role, groups)])[principal_id]

    def add_many(self, entries: Iterable[tuple[str, Role | str, Iterable[str]]]) -> dict[str, str]:
        """Register several principals in one locked write; returns id -> password (shown once).

        Nothing is written if any entry is invalid or already registered.
        """
        now = time.time()
        new: dict[str, Principal] = {}
        passwords: dict[str, str] = {}
        for raw_id, raw_role, raw_groups in entries:
            principal_id = _check_id(raw_id)
            role = _check_role(raw_role)
            group_names = _check_groups(raw_groups)
            if role is not Role.DEVICE and group_names:
                raise InvalidPrincipal("only devices belong to groups")
            if principal_id in new:
                raise PrincipalExists(f"{principal_id!r} is given twice")
            password, argon_hash, mosq_hash = self._new_secret()
            passwords[principal_id] = password
            new[principal_id] = Principal(
                principal_id, role, group_names, argon_hash, mosq_hash, False, now, now
            )
        with self._locked() as principals:
            taken = sorted(set(new) & set(principals))
            if taken:
                raise PrincipalExists(
                    f"{', '.join(map(repr, taken[:5]))} already registered in {self.path}; rotate instead"
                )
            principals.update(new)
        for p in new.values():
            log.info("principal_added", principal=p.id, role=p.role.value, groups=list(p.groups))
        return passwords

    def revoke(self, principal_id: str) -> Principal:
        """Mark a principal revoked: it is refused from now on and a broker disconnects it."""
        with self._locked() as principals:
            principal = principals.get(principal_id)
            if principal is None:
                raise UnknownPrincipal(f"no principal {principal_id!r} in {self.path}")
            principals[principal_id] = replace(principal, revoked=True, rotated=time.time())
        log.info("principal_revoked", principal=principal_id)
        return principals[principal_id]

    def rotate(self, principal_id: str) -> str:
        """Give a principal a new password (and un-revoke it); returns the password, once."""
        password, argon_hash, mosq_hash = self._new_secret()
        with self._locked() as principals:
            principal = principals.get(principal_id)
            if principal is None:
                raise UnknownPrincipal(f"no principal {principal_id!r} in {self.path}")
            principals[principal_id] = replace(
                principal,
                password_hash=argon_hash,
                mosquitto_hash=mosq_hash,
                revoked=False,
                rotated=time.time(),
            )
        log.info("principal_rotated", principal=principal_id)
        return password
