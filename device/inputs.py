"""Where inference inputs come from: pluggable sources behind one small protocol.

Built in:
- ``synthetic``: random tensors of the model's shapes and dtypes (floats in [-1, 1)).
- ``npy:PATH``: a ``.npy`` file or a directory of them, replayed in a loop.  A file holds one sample
  or several stacked along a leading axis.
- ``socket:PATH``: a unix datagram socket the agent binds; another process on the board sends one
  sample per datagram, as ``.npy`` bytes or as the raw little-endian tensor bytes.

A source returns None when it has nothing yet; a sample that does not fit the model raises
InputError, which the inference loop counts and carries on from.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from device.errors import InputError
from device.runtime import TensorSpec

Sample = list[npt.NDArray[Any]]


class InputSource(Protocol):
    def next(self, specs: Sequence[TensorSpec], timeout: float) -> Sample | None: ...

    def close(self) -> None: ...


class SyntheticSource:
    """Random inputs: enough to exercise a model and its watchdog with no sensor attached.

    The values are raw bytes from the standard library's generator (seeded, so a seed repeats its
    sequence), not numpy.random: numpy 2 loads numpy.random on first use only, and it costs 2.7 MiB
    of the agent's RSS (docs/device.md, "Measured").  Floats are uniform in [-1, 1) at 24 bits,
    integers uniform over their dtype's whole range, booleans fair coins.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def _bits(self, count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        dt = np.dtype(dtype)
        # A bytearray, so the array is writable like one numpy.random returns.
        return np.frombuffer(bytearray(self._rng.randbytes(count * dt.itemsize)), dtype=dt)

    def next(self, specs: Sequence[TensorSpec], timeout: float = 0.0) -> Sample:
        out: Sample = []
        for s in specs:
            dt = np.dtype(s.dtype)
            count = math.prod(s.shape)
            if dt.kind == "f":
                steps = self._bits(count, np.int32) >> 8  # -2**23 <= steps < 2**23: exact in float32
                values = np.multiply(steps, 2.0**-23, dtype=np.float32)
                out.append(values.astype(dt, copy=False).reshape(s.shape))
            elif dt.kind in "iu":
                out.append(self._bits(count, dt).reshape(s.shape))
            elif dt.kind == "b":
                out.append((self._bits(count, np.uint8) & 1).astype(dt).reshape(s.shape))
            else:
                raise InputError(f"synthetic source cannot make {s.dtype} inputs")
        return out

    def close(self) -> None:
        return None


def _fit(arr: npt.NDArray[Any], specs: Sequence[TensorSpec]) -> Iterator[Sample]:
    """Split ``arr`` into samples for a single-input model."""
    if len(specs) != 1:
        raise InputError(f"npy and socket sources feed single-input models; this one takes {len(specs)}")
    spec = specs[0]
    per = int(np.prod(spec.shape, dtype=np.int64))
    if per == 0 or arr.size % per:
        raise InputError(f"{arr.size} values do not split into inputs of shape {list(spec.shape)}")
    flat = arr.reshape(-1)
    for start in range(0, arr.size, per):
        yield [flat[start : start + per].reshape(spec.shape).astype(np.dtype(spec.dtype), copy=False)]


class NpySource:
    """Samples from a .npy file or a directory of them, looped forever."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if p.is_dir():
            self._files = sorted(p.glob("*.npy"))
        elif p.is_file():
            self._files = [p]
        else:
            raise InputError(f"npy source {p} does not exist")
        if not self._files:
            raise InputError(f"npy source {p} holds no .npy files")
        self._iter: Iterator[Sample] | None = None
        self._pos = 0

    def _load(self, specs: Sequence[TensorSpec]) -> Iterator[Sample]:
        f = self._files[self._pos % len(self._files)]
        self._pos += 1
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {f}: {exc}") from None
        return _fit(arr, specs)

    def next(self, specs: Sequence[TensorSpec], timeout: float = 0.0) -> Sample | None:
        for _ in range(2):
            if self._iter is None:
                self._iter = self._load(specs)
            sample = next(self._iter, None)
            if sample is not None:
                return sample
            self._iter = None
        return None

    def close(self) -> None:
        self._iter = None


class SocketSource:
    """A unix datagram socket other processes write samples to."""

    MAX_DATAGRAM = 1 << 20

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(str(self.path))
        except OSError as exc:
            self._sock.close()
            raise InputError(f"cannot bind input socket {self.path}: {exc.strerror}") from None

    def next(self, specs: Sequence[TensorSpec], timeout: float) -> Sample | None:
        self._sock.settimeout(max(timeout, 0.001))
        try:
            payload = self._sock.recv(self.MAX_DATAGRAM)
        except (TimeoutError, BlockingIOError):
            return None
        if payload.startswith(b"\x93NUMPY"):
            try:
                arr = np.load(io.BytesIO(payload), allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"datagram is not a readable .npy: {exc}") from None
        else:
            if len(specs) != 1:
                raise InputError("raw datagrams feed single-input models only")
            dt = np.dtype(specs[0].dtype).newbyteorder("<")
            if len(payload) % dt.itemsize:
                raise InputError(f"{len(payload)}-byte datagram is not a whole number of {specs[0].dtype}")
            arr = np.frombuffer(payload, dtype=dt)
        samples = list(_fit(arr, specs))
        if len(samples) != 1:
            raise InputError(f"a datagram must carry one sample, this one carries {len(samples)}")
        return samples[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def make_source(spec: str, seed: int | None = None) -> InputSource:
    """Build the source named in ``[inference] source``."""
    if spec == "synthetic":
        return SyntheticSource(seed)
    if spec.startswith("npy:"):
        return NpySource(spec[4:])
    if spec.startswith("socket:"):
        return SocketSource(spec[7:])
    raise InputError(f"unknown input source {spec!r}: use synthetic, npy:PATH or socket:PATH")
