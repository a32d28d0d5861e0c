"""export-mosquitto: the written files, and a real Mosquitto running them."""

from __future__ import annotations

import json
import queue
import signal
from pathlib import Path

import argon2
import pytest

from broker import acl
from broker.mosquitto import (
    MosquittoSettings,
    export,
    render_acl,
    render_conf,
    render_dynsec,
    render_passwords,
)
from broker.registry import Registry, verify_mosquitto_hash
from schemas import topics
from schemas.codec import DEFAULT_MAX_BYTES
from tests.broker.conftest import (
    OPERATOR,
    REFUSED,
    Client,
    Credentials,
    connect_as,
    export_for_test,
    make_registry,
    run_mosquitto,
    start_mosquitto,
)

FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def reg(tmp_path: Path) -> tuple[Registry, dict[str, str]]:
    registry = Registry.load(tmp_path / "registry.json", FAST)
    passwords = {
        "d1": registry.add("d1", "device", ["g1", "g2"]),
        "gone": registry.add("gone", "device"),
        "ops": registry.add("ops", "operator"),
        "rd": registry.add("rd", "reader"),
    }
    registry.revoke("gone")
    return registry, passwords


def _user_blocks(text: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("user "):
            current = blocks.setdefault(line.split(" ", 1)[1], [])
        elif line.startswith("topic ") and current is not None:
            current.append(line)
    return blocks


def test_acl_file_lists_exactly_the_rules_of_acl_py(reg: tuple[Registry, dict[str, str]]) -> None:
    """Each active principal's block holds its publish rules as write and subscribe rules as read."""
    registry, _ = reg
    blocks = _user_blocks(render_acl(registry.list()))
    assert set(blocks) == {"d1", "ops", "rd"}
    for p in registry.list():
        if p.revoked:
            continue
        expected = [f"topic write {t}" for t in acl.rules(p.role.value, p.id, p.groups, "publish")]
        expected += [f"topic read {t}" for t in acl.rules(p.role.value, p.id, p.groups, "subscribe")]
        assert blocks[p.id] == expected
    assert "pattern" not in render_acl(registry.list())


def test_password_file_holds_verifiable_pbkdf2_hashes_of_active_principals(
    reg: tuple[Registry, dict[str, str]],
) -> None:
    """passwords has a $7$ line per active principal that verifies its password; revoked ones are absent."""
    registry, passwords = reg
    lines = dict(line.split(":", 1) for line in render_passwords(registry.list()).splitlines())
    assert set(lines) == {"d1", "ops", "rd"}
    for name, encoded in lines.items():
        assert verify_mosquitto_hash(passwords[name], encoded)


def test_dynamic_security_json_mirrors_the_rules(reg: tuple[Registry, dict[str, str]]) -> None:
    """One client and one role per active principal, default deny, and our rules (plus $share forms)."""
    registry, passwords = reg
    doc = json.loads(render_dynsec(registry.list()))
    assert doc["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    clients = {c["username"]: c for c in doc["clients"]}
    assert set(clients) == {"d1", "ops", "rd"}
    d1 = clients["d1"]
    assert verify_mosquitto_hash(passwords["d1"], f"$7${d1['iterations']}${d1['salt']}${d1['password']}")
    roles = {r["rolename"]: r["acls"] for r in doc["roles"]}
    d1_acls = roles[d1["roles"][0]["rolename"]]
    sends = {a["topic"] for a in d1_acls if a["acltype"] == "publishClientSend"}
    assert sends == set(acl.rules("device", "d1", ("g1", "g2"), "publish"))
    receives = {a["topic"] for a in d1_acls if a["acltype"] == "publishClientReceive"}
    assert receives == set(acl.rules("device", "d1", ("g1", "g2"), "subscribe"))
    assert f"$share/+/{topics.group_cmd('g2')}" in {a["topic"] for a in d1_acls}


def test_conf_sets_limits_deliberately(tmp_path: Path) -> None:
    """mosquitto.conf refuses anonymous clients, raises the stock queue limits and bounds packet size."""
    conf = render_conf(MosquittoSettings(port=18830, security="file"), tmp_path)
    lines = set(conf.splitlines())
    assert "allow_anonymous false" in lines
    assert "persistence true" in lines
    assert "max_queued_messages 100000" in lines
    assert "max_inflight_messages 100" in lines
    size = next(int(line.split()[1]) for line in lines if line.startswith("max_packet_size "))
    assert DEFAULT_MAX_BYTES < size <= DEFAULT_MAX_BYTES + 64 * 1024
    assert "listener 18830 127.0.0.1" in lines


def test_export_writes_private_files(reg: tuple[Registry, dict[str, str]], tmp_path: Path) -> None:
    """Credential files are written 0600; the config names them by absolute path."""
    registry, _ = reg
    written = export(registry, tmp_path / "out", MosquittoSettings(security="file"))
    for path in written[1:]:
        assert path.stat().st_mode & 0o077 == 0
    conf = written[0].read_text()
    assert f"password_file {(tmp_path / 'out' / 'passwords').resolve()}" in conf


# --- a real Mosquitto ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.mark.mosquitto
def test_acl_file_mode_grants_subscriptions_but_never_delivers_forbidden_topics(
    tmp_path: Path, creds: Credentials, clients: list[Client]
) -> None:
    """With security=file Mosquitto grants every SUBSCRIBE, but its read ACL still withholds the messages."""
    with start_mosquitto(tmp_path, creds.registry, security="file") as port:
        d1 = connect_as(clients, port, creds, "d1")
        assert d1.subscribe(topics.device_cmd("d2")) == 1  # Mosquitto 2.0's acl_file does not check this
        assert d1.subscribe(topics.device_cmd("d1")) == 1
        ops = connect_as(clients, port, creds, OPERATOR)
        ops.publish(topics.device_cmd("d2"), b"for-d2")
        ops.publish(topics.device_cmd("d1"), b"for-d1")
        assert [m.payload for m in d1.wait_for(b"for-d1")] == [b"for-d1"]


@pytest.mark.mosquitto
def test_acl_file_mode_refuses_forbidden_publishes(
    tmp_path: Path, creds: Credentials, clients: list[Client]
) -> None:
    """With security=file a device's publish outside its subtree is not delivered."""
    with start_mosquitto(tmp_path, creds.registry, security="file") as port:
        watcher = connect_as(clients, port, creds, OPERATOR, client_id="watcher")
        assert watcher.subscribe("fleetbus/v1/#") == 1
        d1 = connect_as(clients, port, creds, "d1")
        d1.publish(topics.group_cmd("g2"), b"forged")
        d1.publish(topics.device_stream("d1", topics.DeviceStream.HEALTH), b"marker")
        assert b"forged" not in [m.payload for m in watcher.wait_for(b"marker")]


@pytest.mark.mosquitto
def test_revocation_reaches_mosquitto_after_export_and_sighup(tmp_path: Path, clients: list[Client]) -> None:
    """After revoke, export again and SIGHUP: Mosquitto refuses the device and stops delivering to it."""
    creds = make_registry(tmp_path)
    with run_mosquitto(tmp_path, creds.registry, security="file") as (port, proc):
        d1 = connect_as(clients, port, creds, "d1")
        assert d1.subscribe(topics.device_cmd("d1")) == 1
        Registry.load(creds.registry).revoke("d1")
        export_for_test(creds.registry, tmp_path / "mosquitto", port, security="file")
        proc.send_signal(signal.SIGHUP)
        again = Client(port, "d1-again", "d1", creds.passwords["d1"])
        clients.append(again)
        # SIGHUP is asynchronous: retry a few times until the reloaded password file is in force.
        for _ in range(50):
            rc = again.connect()
            if rc in REFUSED:
                break
            again.close()
            again = Client(port, "d1-again", "d1", creds.passwords["d1"])
            clients.append(again)
        assert rc in REFUSED
        ops = connect_as(clients, port, creds, OPERATOR)
        assert ops.subscribe(topics.device_cmd("d1")) == 1
        ops.publish(topics.device_cmd("d1"), b"after-revoke")
        ops.wait_for(b"after-revoke")
        # The operator got it, so Mosquitto has routed it; the revoked device's read ACL is gone.
        with pytest.raises(queue.Empty):
            d1.messages.get(timeout=0.5)
