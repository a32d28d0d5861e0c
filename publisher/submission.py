"""A rollout document as the CLI hands it to ``fleetbus serve``: signed bytes, checked against pinned keys.

The CLI uploads the model file first (content-addressed by its SHA-256, ``PUT /api/blobs/{sha}``), then
posts a *submission*: the UTF-8 JSON below, an Ed25519 signature over exactly those bytes and the
signing key's id. ``fleetbus serve`` accepts it only if a key it pins made the signature, so whoever
can reach its HTTP port still cannot start a rollout.

    {"kind": "rollout_submission", "v": 1, "ts": 1764220000.0,
     "document": {... the rollout document, model.path reduced to the file name, id filled in ...},
     "model_sha256": "...", "model_size": 1048576}

The document's ``id`` is always filled in before signing: it is otherwise derived from a hash that
includes the model file's name, and the server stores the file under its SHA-256, not its name.
Pure: no network, no files.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from publisher.document import RolloutDocument
from publisher.errors import ConfigError
from schemas.signing import SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KIND = "rollout_submission"
VERSION = 1
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Submission:
    """A checked submission: the document (model path not yet resolved) and the model it names."""

    document: dict[str, Any]
    rollout_id: str
    model_sha256: str
    model_size: int
    ts: float


@dataclass(frozen=True)
class SignedSubmission:
    """What travels: the exact signed bytes, the signature over them and the signing key's id."""

    body: bytes
    signature: bytes
    key_id: str

    def to_json(self) -> dict[str, str]:
        return {
            "submission": base64.b64encode(self.body).decode(),
            "signature": self.signature.hex(),
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedSubmission:
        """Parse the POST body; ``ConfigError`` saying which field is wrong."""
        try:
            body = base64.b64decode(str(data["submission"]), validate=True)
            signature = bytes.fromhex(str(data["signature"]))
            key_id = str(data["key_id"])
        except KeyError as exc:
            raise ConfigError(f"submission: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise ConfigError(f"submission: a field is not valid base64 or hex: {exc}") from None
        return cls(body, signature, key_id)


def sign_submission(
    doc: RolloutDocument,
    model_sha256: str,
    model_size: int,
    *,
    private: Ed25519PrivateKey,
    key_id: str,
    now: float | None = None,
) -> SignedSubmission:
    """Sign ``doc`` for the model with this hash and size (the id is fixed before signing)."""
    data = doc.model_dump(mode="json")
    data["id"] = doc.rollout_id
    data["model"]["path"] = Path(doc.model.path).name
    payload = {
        "kind": KIND,
        "v": VERSION,
        "ts": time.time() if now is None else now,
        "document": data,
        "model_sha256": model_sha256,
        "model_size": model_size,
    }
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return SignedSubmission(body, private.sign(body), key_id)


def open_submission(signed: SignedSubmission, pinned: Mapping[str, Ed25519PublicKey]) -> Submission:
    """The submission inside ``signed`` if a pinned key signed it.

    ``SignatureError`` for an unpinned key or a bad signature; ``ConfigError`` for a well-signed body
    that is not a submission this version understands.
    """
    from cryptography.exceptions import InvalidSignature

    public = pinned.get(signed.key_id)
    if public is None:
        raise SignatureError(
            f"submission signed by key {signed.key_id}, which this server does not pin; "
            "start `fleetbus serve` with --trust for that key's .pub file"
        )
    try:
        public.verify(signed.signature, signed.body)
    except InvalidSignature:
        raise SignatureError(f"bad signature on the submission from key {signed.key_id}") from None
    try:
        data = json.loads(signed.body)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("submission is not JSON") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise ConfigError(f"submission kind must be {KIND!r}")
    version = data.get("v")
    if not isinstance(version, int) or version > VERSION:
        raise ConfigError(f"submission version {version!r} is newer than this server understands; upgrade it")
    document, sha, size, ts = (
        data.get("document"),
        data.get("model_sha256"),
        data.get("model_size"),
        data.get("ts"),
    )
    if not isinstance(document, dict) or not isinstance(document.get("id"), str):
        raise ConfigError("submission: document must be a table with its id filled in")
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise ConfigError("submission: model_sha256 must be a lowercase hex SHA-256")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError("submission: model_size must be a positive integer")
    if not isinstance(ts, (int, float)):
        raise ConfigError("submission: ts must be a number")
    return Submission(document, str(document["id"]), sha, size, float(ts))
