"""Versions of installed distributions, read from their metadata without ``importlib.metadata``.

Importing ``importlib.metadata`` brings ``email``, ``zipfile``, ``csv`` and ``tempfile`` with it, which
the agent otherwise does without (docs/device.md, "Measured").  Imports nothing heavy, so the lean
entry can ask for numpy's version before numpy is imported.
"""

from __future__ import annotations

import functools
import os
import re
import sys


# Cached: a birth on every reconnect asks again, and a version installed under a running process
# is not the one it runs anyway.
@functools.cache
def installed_version(dist: str) -> str | None:
    """The version of the installed distribution `dist` (a wheel's or an editable install's), or None.

    What ``importlib.metadata.version`` answers for a ``.dist-info`` or ``.egg-info`` directory on
    ``sys.path``, read by hand.
    """
    # Directory names carry the name normalized (PEP 503 lower case, "_" for runs of "-_."), but
    # older tools wrote them as typed, so names are compared normalized.
    want = _normalized(dist)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if not dot or suffix not in ("dist-info", "egg-info") or _normalized(stem.split("-")[0]) != want:
                continue
            meta = os.path.join(entry or ".", name, "METADATA" if suffix == "dist-info" else "PKG-INFO")
            version = _metadata_version(meta)
            if version is not None:
                return version
    return None


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _metadata_version(path: str) -> str | None:
    """The ``Version:`` header of a core metadata file (RFC 822 headers end at the first blank line)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, colon, value = line.partition(":")
                if colon and key.strip().lower() == "version":
                    return value.strip()
    except OSError:
        return None
    return None
