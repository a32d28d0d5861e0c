"""Ed25519 checks through the system libcrypto (schemas/openssl_ed25519.py): RFC 8032's vectors, the
same verdicts as ``cryptography`` on valid and tampered signatures, and the fallback when the
library is missing or answers wrong."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import openssl_ed25519, signing
from schemas.errors import SchemaError

# RFC 8032, section 7.1, TESTs 1-3: (public key, message, signature).
RFC8032 = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
        "d25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c"
        "387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc659"
        "4a7c15e9716ed28dc027beceea1ec40a",
    ),
]

needs_libcrypto = pytest.mark.skipif(
    openssl_ed25519.load() is None, reason="this Python's hashlib maps no libcrypto with Ed25519"
)


@pytest.fixture
def fresh_loader() -> Iterator[None]:
    """Forget the process-wide load so a test can make it fail, and restore it afterwards."""
    saved = list(openssl_ed25519._loaded)
    openssl_ed25519._loaded.clear()
    try:
        yield
    finally:
        openssl_ed25519._loaded[:] = saved


@needs_libcrypto
@pytest.mark.parametrize(("public", "message", "signature"), RFC8032)
def test_rfc8032_vectors_verify_and_a_flipped_bit_does_not(public: str, message: str, signature: str) -> None:
    key = openssl_ed25519.public_key(bytes.fromhex(public))
    assert key is not None
    sig, msg = bytes.fromhex(signature), bytes.fromhex(message)
    assert key.valid(sig, msg)
    assert not key.valid(sig[:10] + bytes([sig[10] ^ 0x40]) + sig[11:], msg)
    assert not key.valid(sig, msg + b"\x00")


@needs_libcrypto
@settings(max_examples=60, deadline=None)
@given(
    message=st.binary(max_size=2048),
    flip=st.integers(0, 64 * 8 - 1),
    seed=st.binary(min_size=32, max_size=32),
)
def test_verdicts_match_cryptography(message: bytes, flip: int, seed: bytes) -> None:
    """Valid, tampered-signature, tampered-message and other-key cases: the two libraries agree."""
    private = Ed25519PrivateKey.from_private_bytes(seed)
    other = Ed25519PrivateKey.from_private_bytes(bytes(reversed(seed)))
    raw = private.public_key().public_bytes_raw()
    ours = openssl_ed25519.public_key(raw)
    assert ours is not None
    sig = private.sign(message)
    bad_sig = bytearray(sig)
    bad_sig[flip // 8] ^= 1 << (flip % 8)
    cases = [
        (sig, message),
        (bytes(bad_sig), message),
        (sig, message + b"!"),
        (other.sign(message), message),
    ]
    for signature, data in cases:
        try:
            private.public_key().verify(signature, data)
            theirs = True
        except Exception:
            theirs = False
        assert ours.valid(signature, data) is theirs
    assert ours.valid(sig, message)


@needs_libcrypto
def test_wrong_lengths_are_refused_not_crashed() -> None:
    key = openssl_ed25519.public_key(bytes.fromhex(RFC8032[0][0]))
    assert key is not None
    sig = bytes.fromhex(RFC8032[0][2])
    assert not key.valid(sig[:63], b"")
    assert not key.valid(sig + b"\x00", b"")
    with pytest.raises(SchemaError):
        openssl_ed25519.public_key(b"\x01" * 31)


@needs_libcrypto
def test_device_keys_use_libcrypto_and_check_deploys_like_cryptography() -> None:
    private = Ed25519PrivateKey.generate()
    public_hex = private.public_key().public_bytes_raw().hex()
    pinned = signing.pin_device_keys([public_hex])
    assert isinstance(pinned[signing.key_id(public_hex)], openssl_ed25519.OpenSslKey)
    deploy = _deploy(private, public_hex, b"manifest bytes")
    signing.check_signature(deploy, pinned)
    with pytest.raises(signing.SignatureError, match="bad signature"):
        signing.check_signature(_deploy(private, public_hex, b"manifest bytes", tamper=True), pinned)


def test_without_libcrypto_device_keys_fall_back_to_cryptography(
    fresh_loader: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openssl_ed25519, "_mapped_libcrypto", lambda: None)
    private = Ed25519PrivateKey.generate()
    public_hex = private.public_key().public_bytes_raw().hex()
    pinned = signing.pin_device_keys([public_hex])
    assert isinstance(pinned[signing.key_id(public_hex)], Ed25519PublicKey)
    signing.check_signature(_deploy(private, public_hex, b"m"), pinned)
    with pytest.raises(signing.SignatureError):
        signing.check_signature(_deploy(private, public_hex, b"m", tamper=True), pinned)


@needs_libcrypto
def test_a_binding_that_accepts_a_corrupted_vector_is_not_used(
    fresh_loader: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load-time self-test: a library that says yes to everything is refused, and keys fall back."""
    real_bind = openssl_ed25519._bind

    def yes_to_everything(path: str) -> Any:
        lib = real_bind(path)

        class Lying:
            def __getattr__(self, name: str) -> Any:
                return getattr(lib, name)

            @staticmethod
            def EVP_DigestVerify(*args: Any) -> int:
                return 1

        return Lying()

    monkeypatch.setattr(openssl_ed25519, "_bind", yes_to_everything)
    assert openssl_ed25519.load() is None
    assert openssl_ed25519.public_key(b"\x02" * 32) is None


def _deploy(private: Ed25519PrivateKey, public_hex: str, body: bytes, tamper: bool = False) -> Any:
    from schemas import plain

    sig = private.sign(body)
    if tamper:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    return plain.Deploy(rollout_id="r1", manifest=body, signature=sig, key_id=signing.key_id(public_hex))
