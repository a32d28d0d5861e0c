"""broker.registry: the file-backed principal registry, on real files."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
from pathlib import Path

import argon2
import pytest

from broker.errors import InvalidPrincipal, PrincipalExists, RegistryFileError, UnknownPrincipal
from broker.registry import (
    REGISTRY_ENV,
    Registry,
    Role,
    default_registry_path,
    mosquitto_hash,
    verify_mosquitto_hash,
)

# Real argon2id, with the smallest cost so the unit tests stay fast; the broker uses the defaults.
FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry.load(tmp_path / "registry.json", FAST)


def test_missing_file_is_an_empty_registry(reg: Registry) -> None:
    """Opening a registry that does not exist yet gives no principals and creates nothing."""
    assert reg.list() == []
    assert not reg.path.exists()


def test_add_returns_a_password_that_is_never_stored(reg: Registry) -> None:
    """add() hands out the password once; the file holds only argon2 and PBKDF2 hashes of it."""
    password = reg.add("d1", "device", ["g1", "g0"])
    text = reg.path.read_text()
    assert password not in text
    entry = json.loads(text)["principals"][0]
    assert entry["argon2"].startswith("$argon2id$")
    assert entry["pbkdf2_sha512"].startswith("$7$")
    assert entry["groups"] == ["g0", "g1"]
    assert stat.S_IMODE(os.stat(reg.path).st_mode) == 0o600
    assert len(password) >= 32


def test_verify_accepts_only_the_current_password(reg: Registry) -> None:
    """verify() returns the principal for the right password and None for a wrong one or unknown id."""
    password = reg.add("d1", Role.DEVICE, ["g1"])
    principal = reg.verify("d1", password)
    assert principal is not None
    assert (principal.id, principal.role, principal.groups) == ("d1", Role.DEVICE, ("g1",))
    assert reg.verify("d1", password + "x") is None
    assert reg.verify("d2", password) is None


def test_revoke_refuses_even_a_cached_password(reg: Registry) -> None:
    """After revoke() the right password is refused, although its check is in the cache."""
    password = reg.add("d1")
    assert reg.verify("d1", password) is not None
    reg.revoke("d1")
    assert reg.verify("d1", password) is None
    assert reg.get("d1").revoked


def test_rotate_invalidates_the_old_password_and_readmits(reg: Registry) -> None:
    """rotate() gives a new password; the old one (even cached) stops working; a revoked id is readmitted."""
    old = reg.add("d1")
    assert reg.verify("d1", old) is not None
    reg.revoke("d1")
    new = reg.rotate("d1")
    assert new != old
    assert reg.verify("d1", old) is None
    assert reg.verify("d1", new) is not None
    assert not reg.get("d1").revoked


def test_successful_checks_are_cached(reg: Registry) -> None:
    """A second verify() of the same credentials is served from the cache, not argon2."""
    password = reg.add("d1")
    reg.verify("d1", password)
    misses = reg.cache_misses
    for _ in range(5):
        assert reg.verify("d1", password) is not None
    assert reg.cache_misses == misses
    assert reg.cache_hits == 5
    assert reg.verify("d1", "wrong") is None
    assert reg.cache_misses == misses + 1


def test_changes_by_another_process_are_seen(tmp_path: Path) -> None:
    """A second Registry on the same file (another process) sees adds and revokes on its next call."""
    path = tmp_path / "registry.json"
    writer = Registry.load(path, FAST)
    reader = Registry.load(path, FAST)
    password = writer.add("d1")
    assert reader.verify("d1", password) is not None
    writer.revoke("d1")
    assert reader.verify("d1", password) is None
    assert reader.reload_if_changed() is False


@pytest.mark.parametrize(
    ("pid", "role", "groups", "error"),
    [
        ("d/1", "device", [], InvalidPrincipal),
        ("d+", "device", [], InvalidPrincipal),
        ("", "device", [], InvalidPrincipal),
        ("d1", "admin", [], InvalidPrincipal),
        ("d1", "device", ["g#"], InvalidPrincipal),
        ("ops", "operator", ["g1"], InvalidPrincipal),
    ],
)
def test_bad_principals_are_refused(
    reg: Registry, pid: str, role: str, groups: list[str], error: type
) -> None:
    """Ids and groups must be single topic levels, roles must exist, and only devices have groups."""
    with pytest.raises(error):
        reg.add(pid, role, groups)
    assert reg.list() == []


def test_duplicates_and_unknown_ids(reg: Registry) -> None:
    """add() of an existing id and revoke()/rotate() of an unknown one raise registry errors."""
    reg.add("d1")
    with pytest.raises(PrincipalExists):
        reg.add("d1")
    with pytest.raises(UnknownPrincipal):
        reg.revoke("nope")
    with pytest.raises(UnknownPrincipal):
        reg.rotate("nope")


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"format": "something-else"}', '{"format": "fleetbus-registry", "version": 99}'],
)
def test_unreadable_files_raise_registry_file_error(tmp_path: Path, content: str) -> None:
    """A file that is not a fleetbus registry, or of a newer format, is an error that says so."""
    path = tmp_path / "registry.json"
    path.write_text(content)
    with pytest.raises(RegistryFileError):
        Registry.load(path, FAST)


def _add_many(path: str, prefix: str) -> None:
    registry = Registry.load(path, FAST)
    for i in range(5):
        registry.add(f"{prefix}-{i}")


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Four processes adding at once all land in the file (flock + re-read + atomic rename)."""
    path = str(tmp_path / "registry.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(path, f"p{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(Registry.load(path, FAST)) == 20
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_default_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """$FLEETBUS_REGISTRY names the registry; without it, ./fleetbus-registry.json."""
    monkeypatch.setenv(REGISTRY_ENV, "/srv/reg.json")
    assert default_registry_path() == Path("/srv/reg.json")
    monkeypatch.delenv(REGISTRY_ENV)
    assert default_registry_path() == Path("fleetbus-registry.json")


def test_mosquitto_hash_round_trips() -> None:
    """Our $7$ hash verifies the password it was made from, and only that one."""
    encoded = mosquitto_hash("secret")
    assert encoded.startswith("$7$101$")
    assert verify_mosquitto_hash("secret", encoded)
    assert not verify_mosquitto_hash("Secret", encoded)
    assert not verify_mosquitto_hash("secret", "$6$abc$def")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_mosquitto_passwd_hashes_verify_with_our_code(tmp_path: Path) -> None:
    """A hash written by mosquitto_passwd itself verifies with ours, so the formats are the same."""
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "alice", "s3cret"], check=True)
    encoded = pwfile.read_text().strip().split(":", 1)[1]
    assert verify_mosquitto_hash("s3cret", encoded)
    assert not verify_mosquitto_hash("other", encoded)


def test_add_many_writes_once_and_is_all_or_nothing(reg: Registry) -> None:
    """add_many registers a batch in one write; a clash with an existing id registers none of it."""
    passwords = reg.add_many([(f"d{i}", "device", ["g"]) for i in range(50)])
    assert len(passwords) == 50
    assert reg.verify("d7", passwords["d7"]) is not None
    with pytest.raises(PrincipalExists):
        reg.add_many([("new-1", "device", []), ("d3", "device", [])])
    assert reg.find("new-1") is None
    with pytest.raises(PrincipalExists):
        reg.add_many([("x", "device", []), ("x", "device", [])])


def test_a_corrupted_file_keeps_the_last_good_copy_for_verify(tmp_path: Path) -> None:
    """A broker's verify() keeps serving the last good registry when the file turns unreadable."""
    path = tmp_path / "registry.json"
    registry = Registry.load(path, FAST)
    password = registry.add("d1")
    path.write_text("{ not json")
    assert registry.verify("d1", password) is not None
    with pytest.raises(RegistryFileError):
        Registry.load(path, FAST)
