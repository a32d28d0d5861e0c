"""Manifest signatures and the exported machine-readable contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import codec, signing, spec, topics
from schemas.messages import KINDS, Deploy, Manifest

SHA = "ab" * 32


def _manifest(version: str = "1.0.0") -> Manifest:
    return Manifest(
        rollout_id="r1", version=version, model_sha256=SHA, size=10, chunk_size=1024, chunk_sha256=[SHA]
    )


def test_signed_manifest_verifies_with_the_pinned_key(tmp_path: Path) -> None:
    """A deploy signed by a pinned key yields the exact manifest that was signed."""
    priv_path, pub_path = signing.write_keypair(tmp_path)
    private, kid = signing.load_private_key(priv_path)
    deploy = signing.sign(_manifest(), private, kid)
    pinned = signing.pin_keys([str(pub_path)])
    assert signing.verify(codec.decode_as(codec.encode(deploy), Deploy), pinned) == _manifest().model_copy(
        update={"ts": signing.verify(deploy, pinned).ts}
    )


def test_tampered_manifest_unknown_key_and_unsigned_are_refused(tmp_path: Path) -> None:
    """Changing one byte, signing with another key or dropping the signature raises SignatureError."""
    _, pub_path = signing.write_keypair(tmp_path, "good")
    other_priv, _ = signing.write_keypair(tmp_path, "other")
    pinned = signing.pin_keys([pub_path.read_text()])
    good_priv, kid = signing.load_private_key(tmp_path / "good.key")
    deploy = signing.sign(_manifest(), good_priv, kid)
    tampered = deploy.model_copy(update={"manifest": deploy.manifest.replace(b"1.0.0", b"9.0.0")})
    with pytest.raises(signing.SignatureError, match="bad signature"):
        signing.verify(tampered, pinned)
    private, other_kid = signing.load_private_key(other_priv)
    with pytest.raises(signing.SignatureError, match="does not pin"):
        signing.verify(signing.sign(_manifest(), private, other_kid), pinned)
    with pytest.raises(signing.SignatureError, match="unsigned"):
        signing.verify(deploy.model_copy(update={"signature": b""}), pinned)


def test_private_key_is_not_overwritten(tmp_path: Path) -> None:
    """keys generate refuses to clobber an existing signing key."""
    signing.write_keypair(tmp_path)
    with pytest.raises(signing.SignatureError, match="refusing"):
        signing.write_keypair(tmp_path)
    assert (tmp_path / "publisher.key").stat().st_mode & 0o077 == 0


def test_export_writes_a_schema_per_kind_and_asyncapi(tmp_path: Path) -> None:
    """schema export writes one JSON Schema per kind and an AsyncAPI 3 document of the tree."""
    written = spec.export(tmp_path)
    assert {p.name for p in written} == {f"{k}.schema.json" for k in KINDS} | {"asyncapi.json"}
    chunk = json.loads((tmp_path / "chunk.schema.json").read_text())
    assert {"sha256", "index", "data"} <= set(chunk["required"])
    doc = json.loads((tmp_path / "asyncapi.json").read_text())
    assert doc["asyncapi"].startswith("3.")
    assert doc["channels"]["deviceState"]["address"] == f"{topics.PREFIX}/dev/{{device}}/state"
    referenced = {
        ref["$ref"].rsplit("/", 1)[1] for ch in doc["channels"].values() for ref in ch["messages"].values()
    }
    assert referenced == KINDS - {"manifest"} | {"manifest"}
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].removeprefix("#/channels/") in doc["channels"]


def test_asyncapi_addresses_match_the_builders() -> None:
    """Each channel address, with its parameters filled in, parses as a fleetbus topic."""
    values = {"device": "d1", "group": "g1", "rollout": "r1", "sha256": SHA, "index": "5"}
    for channel in spec.asyncapi()["channels"].values():
        address = channel["address"]
        for name, value in values.items():
            address = address.replace("{" + name + "}", value)
        assert topics.parse(address).build() == address
