"""Machine-readable contract for backends in other languages: JSON Schemas and an AsyncAPI 3 document.

The AsyncAPI channels are generated from the same builders that make the topics (``schemas.topics``)
and the payload schemas from the same models that validate messages, so the document cannot drift
from the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas import topics
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION

# (channel id, address with {params}, params, message kinds, action seen from a backend, retained?, summary)
_CHANNELS: list[tuple[str, str, list[str], list[str], str, bool, str]] = [
    (
        "deviceDesired",
        "desired/dev/{device}",
        ["device"],
        ["deploy"],
        "send",
        True,
        "Signed deploy for one device (retained desired state).",
    ),
    (
        "groupDesired",
        "desired/grp/{group}",
        ["group"],
        ["deploy"],
        "send",
        True,
        "Signed deploy for a group (retained desired state).",
    ),
    (
        "deviceCommand",
        "cmd/dev/{device}",
        ["device"],
        ["rebirth", "cancel"],
        "send",
        False,
        "Transient commands to one device.",
    ),
    (
        "groupCommand",
        "cmd/grp/{group}",
        ["group"],
        ["rebirth", "cancel"],
        "send",
        False,
        "Transient commands to a group.",
    ),
    (
        "rolloutManifest",
        "manifest/{rollout}",
        ["rollout"],
        ["manifest"],
        "receive",
        True,
        "The manifest of a rollout, for backends (retained).",
    ),
    (
        "blobChunk",
        "blob/{sha256}/{index}",
        ["sha256", "index"],
        ["chunk"],
        "send",
        False,
        "A model chunk sent once to every device fetching that file.",
    ),
    (
        "pushChunk",
        "push/{group}/{sha256}/{index}",
        ["group", "sha256", "index"],
        ["chunk"],
        "send",
        False,
        "The first chunks of a file, sent to a group right after its deploy (live members only).",
    ),
    (
        "repairChunk",
        "repair/{device}/{sha256}/{index}",
        ["device", "sha256", "index"],
        ["chunk"],
        "send",
        False,
        "A model chunk one device asked for again.",
    ),
    (
        "deviceBirth",
        "dev/{device}/birth",
        ["device"],
        ["birth"],
        "receive",
        True,
        "Birth certificate: capabilities and active model (retained).",
    ),
    (
        "deviceDeath",
        "dev/{device}/death",
        ["device"],
        ["death"],
        "receive",
        True,
        "Last Will; stale when its bdseq is not the latest birth's (retained).",
    ),
    (
        "deviceState",
        "dev/{device}/state",
        ["device"],
        ["state"],
        "receive",
        True,
        "Rollout execution status of the device (retained).",
    ),
    ("deviceHealth", "dev/{device}/health", ["device"], ["health"], "receive", False, "Periodic health."),
    (
        "deviceResults",
        "dev/{device}/results",
        ["device"],
        ["results"],
        "receive",
        False,
        "Batched inference results.",
    ),
    (
        "deviceFetch",
        "dev/{device}/fetch",
        ["device"],
        ["fetch"],
        "receive",
        False,
        "Chunk repair request with the device's bitmap.",
    ),
    (
        "deviceShadow",
        "dev/{device}/shadow",
        ["device"],
        ["shadow"],
        "receive",
        False,
        "Agreement of a shadow candidate model with the active one.",
    ),
    (
        "rolloutControl",
        "rollout/{rollout}/control",
        ["rollout"],
        ["rollout_control"],
        "send",
        False,
        "Pause, resume or cancel a rollout driven by fleetbus serve.",
    ),
    (
        "rolloutStatus",
        "rollout/{rollout}/status",
        ["rollout"],
        ["rollout_status"],
        "receive",
        True,
        "Where a staged rollout stands: waves, states, gates (retained).",
    ),
    ("fleetAggregate", "agg/fleet", [], ["aggregate"], "receive", True, "Fleet aggregate (retained)."),
    (
        "groupAggregate",
        "agg/group/{group}",
        ["group"],
        ["aggregate"],
        "receive",
        True,
        "Per-group aggregate (retained).",
    ),
    (
        "rolloutAggregate",
        "agg/rollout/{rollout}",
        ["rollout"],
        ["aggregate"],
        "receive",
        True,
        "Per-rollout aggregate (retained).",
    ),
]

_PARAM_DESCRIPTIONS = {
    "device": "Device id: 1-64 characters of [A-Za-z0-9._:-], starting with a letter or digit.",
    "group": "Group name, same rules as a device id.",
    "rollout": "Rollout id, same rules as a device id.",
    "sha256": "Lowercase hex SHA-256 of the whole model file.",
    "index": "Chunk index, a non-negative decimal integer without leading zeros.",
}


def message_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema (draft 2020-12) of every message kind, keyed by kind."""
    out: dict[str, dict[str, Any]] = {}
    for model in MESSAGE_TYPES:
        kind = model.model_fields["kind"].default
        schema = model.model_json_schema(mode="serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"fleetbus/v{SCHEMA_VERSION}/{kind}.json"
        schema["description"] = (schema.get("description") or "").strip() + (
            "\n\nEncoded as a msgpack map; fields typed as binary are msgpack bin."
        )
        out[str(kind)] = schema
    return out


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the topic tree, with payloads from the message schemas."""
    schemas = message_schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for cid, address, params, kinds, action, retained, summary in _CHANNELS:
        channels[cid] = {
            "address": f"{topics.PREFIX}/{address}",
            "description": summary,
            "messages": {k: {"$ref": f"#/components/messages/{k}"} for k in kinds},
            "parameters": {p: {"description": _PARAM_DESCRIPTIONS[p]} for p in params},
        }
        operations[f"{action}{cid[0].upper()}{cid[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": summary,
            "bindings": {
                "mqtt": {"qos": 0 if cid in ("deviceHealth", "deviceResults") else 1, "retain": retained}
            },
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "fleetbus",
            "version": f"{topics.VERSION}.{SCHEMA_VERSION}",
            "description": "Model rollouts to device fleets and their telemetry over MQTT. "
            "Payloads are msgpack maps; every map has kind, v (schema version) and ts (Unix seconds).",
        },
        "defaultContentType": "application/msgpack",
        "servers": {"local": {"host": "127.0.0.1:1883", "protocol": "mqtt", "protocolVersion": "3.1.1"}},
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {
                kind: {"name": kind, "contentType": "application/msgpack", "payload": schema}
                for kind, schema in schemas.items()
            }
        },
    }


def export(directory: Path) -> list[Path]:
    """Write one ``KIND.schema.json`` per message and ``asyncapi.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for kind, schema in message_schemas().items():
        path = directory / f"{kind}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    path = directory / "asyncapi.json"
    path.write_text(json.dumps(asyncapi(), indent=2) + "\n")
    written.append(path)
    return written
