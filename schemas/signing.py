"""Ed25519 signatures over manifests: the publisher signs, devices check against pinned keys.

The signature covers the exact manifest bytes carried inside a ``Deploy``, so there is no
canonical-form question: what was signed is what is decoded.

Keys are written as hex of the raw 32-byte keys (one line each) so they paste into TOML. A key id is
the first 16 hex digits of the SHA-256 of the raw public key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from schemas.errors import SchemaError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from schemas.messages import Deploy, Manifest
    from schemas.openssl_ed25519 import OpenSslKey

    PinnedKey = Ed25519PublicKey | OpenSslKey

# The device checks signatures with schemas.plain, which must not pull pydantic in through here: the
# pydantic models are imported inside sign() and verify(), which only the publisher side calls.


class SignatureError(SchemaError):
    """A deploy whose signature is missing, made by an unpinned key, or wrong."""


def key_id(public_key_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def generate_keypair() -> tuple[str, str]:
    """Return (private_hex, public_hex) of a fresh Ed25519 key pair."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    return private.private_bytes_raw().hex(), private.public_key().public_bytes_raw().hex()


def write_keypair(directory: str | os.PathLike[str], name: str = "publisher") -> tuple[Path, Path]:
    """Write NAME.key (mode 0600) and NAME.pub into DIRECTORY; refuse to overwrite a key."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if priv_path.exists():
        raise SignatureError(f"{priv_path} exists; refusing to overwrite a signing key")
    private_hex, public_hex = generate_keypair()
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(private_hex + "\n")
    pub_path.write_text(public_hex + "\n")
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, str]:
    """Load a private key file; returns the key and its key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
        private = Ed25519PrivateKey.from_private_bytes(raw)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read Ed25519 private key {path}: {exc}") from None
    return private, key_id(private.public_key().public_bytes_raw().hex())


def read_public_key(value: str) -> str:
    """Accept a hex public key or the path of a .pub file; return the hex key."""
    text = value.strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
        try:
            text = Path(value).read_text().strip()
        except OSError as exc:
            raise SignatureError(
                f"{value!r} is neither a hex Ed25519 public key nor a readable file: {exc}"
            ) from None
    if len(text) != 64:
        raise SignatureError(f"public key {text[:16]!r}... is not 32 bytes of hex")
    return text.lower()


def pin_keys(values: list[str]) -> dict[str, Ed25519PublicKey]:
    """Turn configured public keys (hex or paths) into {key_id: key}."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pinned: dict[str, Ed25519PublicKey] = {}
    for value in values:
        hex_key = read_public_key(value)
        pinned[key_id(hex_key)] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    return pinned


def pin_device_keys(values: list[str]) -> dict[str, PinnedKey]:
    """``pin_keys`` for the device: checked by the libcrypto ``hashlib`` already maps
    (``schemas.openssl_ed25519``) when that works here, so ``cryptography`` is never imported."""
    from schemas.openssl_ed25519 import public_key

    pinned: dict[str, PinnedKey] = {}
    for value in values:
        hex_key = read_public_key(value)
        key = public_key(bytes.fromhex(hex_key))
        pinned[key_id(hex_key)] = key if key is not None else pin_keys([hex_key])[key_id(hex_key)]
    return pinned


class SignedDeploy(Protocol):
    """What a signature check reads from a deploy: a pydantic ``Deploy`` or a ``schemas.plain`` one."""

    @property
    def rollout_id(self) -> str: ...
    @property
    def manifest(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...
    @property
    def key_id(self) -> str: ...


def sign(manifest: Manifest, private: Ed25519PrivateKey, kid: str) -> Deploy:
    from schemas.codec import encode
    from schemas.messages import Deploy

    body = encode(manifest)
    return Deploy(rollout_id=manifest.rollout_id, manifest=body, signature=private.sign(body), key_id=kid)


def check_signature(deploy: SignedDeploy, pinned: Mapping[str, PinnedKey]) -> None:
    """Return if a pinned key signed ``deploy.manifest``; raise SignatureError if not."""
    if not deploy.signature:
        raise SignatureError(f"rollout {deploy.rollout_id}: manifest is unsigned")
    public = pinned.get(deploy.key_id)
    if public is None:
        raise SignatureError(
            f"rollout {deploy.rollout_id}: signed by key {deploy.key_id}, which this device does not pin"
        )
    if not _valid(public, deploy.signature, deploy.manifest):
        raise SignatureError(f"rollout {deploy.rollout_id}: bad signature from key {deploy.key_id}")


def _valid(public: PinnedKey, signature: bytes, data: bytes) -> bool:
    from schemas.openssl_ed25519 import OpenSslKey

    if isinstance(public, OpenSslKey):
        return public.valid(signature, data)
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def check_rollout_id(deploy: SignedDeploy, manifest_rollout_id: str) -> None:
    """Raise SignatureError if the signed manifest names another rollout than its deploy."""
    if manifest_rollout_id != deploy.rollout_id:
        raise SignatureError(
            f"deploy says rollout {deploy.rollout_id} but its signed manifest says {manifest_rollout_id}"
        )


def verify(deploy: Deploy, pinned: Mapping[str, PinnedKey]) -> Manifest:
    """Return the manifest inside ``deploy`` if a pinned key signed it; raise SignatureError if not."""
    from schemas.codec import decode_as
    from schemas.messages import Manifest

    check_signature(deploy, pinned)
    manifest = decode_as(deploy.manifest, Manifest)
    check_rollout_id(deploy, manifest.rollout_id)
    return manifest
