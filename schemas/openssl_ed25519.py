"""Ed25519 signature checks through the OpenSSL that ``hashlib`` has already mapped, via ctypes.

The device checks one signature per deploy. Doing that with the ``cryptography`` package maps its
own OpenSSL build and Rust bindings for the rest of the agent's life: 6-7 MiB of RSS, against a
45 MiB budget. The system ``libcrypto`` is in the process anyway (``_hashlib`` links it), and its
``EVP_DigestVerify`` is the same vetted Ed25519 code; reaching it costs ``ctypes`` (about 0.6 MiB).

``load()`` finds that library in ``/proc/self/maps``, binds the five EVP calls, and checks the
binding against RFC 8032's first test vector (and a corrupted copy of it) before anyone relies on
it. Anything missing (no ``/proc``, a ``hashlib`` built without OpenSSL, an OpenSSL older than 1.1.1
or without Ed25519) makes it return None, and ``schemas.signing.pin_device_keys`` falls back to
``cryptography``.
"""

from __future__ import annotations

import threading
from typing import Any

from schemas.errors import SchemaError

_NID_ED25519 = 1087  # EVP_PKEY_ED25519 (NID_ED25519) in every OpenSSL since 1.1.1

# RFC 8032, section 7.1, TEST 1: the empty message.
_RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
    "d25bf5f0595bbe24655141438e7a100b"
)

_lock = threading.Lock()
_loaded: list[Any] = []  # [library or None], once tried


class OpenSslKey:
    """A pinned Ed25519 public key, checked by libcrypto's ``EVP_DigestVerify``."""

    def __init__(self, lib: Any, raw: bytes) -> None:
        if len(raw) != 32:
            raise SchemaError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        self._lib = lib
        self._pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, raw, len(raw))
        if not self._pkey:
            lib.ERR_clear_error()
            raise SchemaError(f"libcrypto refused the public key {raw.hex()[:16]}...")

    def valid(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature of ``data``."""
        if len(signature) != 64:
            return False
        lib = self._lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            if lib.EVP_DigestVerifyInit(ctx, None, None, None, self._pkey) != 1:
                return False
            return bool(lib.EVP_DigestVerify(ctx, signature, len(signature), data, len(data)) == 1)
        finally:
            lib.EVP_MD_CTX_free(ctx)
            lib.ERR_clear_error()  # a failed check leaves its reason on this thread's error queue

    def __del__(self) -> None:
        pkey, self._pkey = getattr(self, "_pkey", None), None
        if pkey:
            self._lib.EVP_PKEY_free(pkey)


def _mapped_libcrypto() -> str | None:
    import _hashlib  # noqa: F401 - maps libcrypto, if this Python's hashlib uses OpenSSL

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                name = path.rsplit("/", 1)[-1]
                if name.startswith("libcrypto.so") and path.startswith("/"):
                    return path
    except OSError:
        return None
    return None


def _bind(path: str) -> Any:
    import ctypes

    lib = ctypes.CDLL(path)
    p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.EVP_PKEY_new_raw_public_key.restype = p
    lib.EVP_PKEY_new_raw_public_key.argtypes = [i, p, ctypes.c_char_p, size]
    lib.EVP_PKEY_free.restype = None
    lib.EVP_PKEY_free.argtypes = [p]
    lib.EVP_MD_CTX_new.restype = p
    lib.EVP_MD_CTX_new.argtypes = []
    lib.EVP_MD_CTX_free.restype = None
    lib.EVP_MD_CTX_free.argtypes = [p]
    lib.EVP_DigestVerifyInit.restype = i
    lib.EVP_DigestVerifyInit.argtypes = [p, p, p, p, p]
    lib.EVP_DigestVerify.restype = i
    lib.EVP_DigestVerify.argtypes = [p, ctypes.c_char_p, size, ctypes.c_char_p, size]
    lib.ERR_clear_error.restype = None
    lib.ERR_clear_error.argtypes = []
    return lib


def load() -> Any | None:
    """The bound libcrypto if it checks RFC 8032's vector right, else None (tried once per process)."""
    with _lock:
        if not _loaded:
            _loaded.append(_try_load())
        return _loaded[0]


def _try_load() -> Any | None:
    path = _mapped_libcrypto()
    if path is None:
        return None
    try:
        lib = _bind(path)
        key = OpenSslKey(lib, _RFC8032_PUBLIC)
        bad = bytes([_RFC8032_SIGNATURE[0] ^ 1]) + _RFC8032_SIGNATURE[1:]
        if key.valid(_RFC8032_SIGNATURE, b"") and not key.valid(bad, b""):
            return lib
    except (OSError, AttributeError, SchemaError):  # no such library or symbol, or no Ed25519
        pass
    return None


def public_key(raw: bytes) -> OpenSslKey | None:
    """A key checked by the system libcrypto, or None when that is not usable here."""
    lib = load()
    return None if lib is None else OpenSslKey(lib, raw)
