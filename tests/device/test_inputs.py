"""Input sources: synthetic, .npy files and a unix datagram socket another process writes to."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest

from device.errors import InputError
from device.inputs import NpySource, SocketSource, SyntheticSource, make_source
from device.runtime import TensorSpec

F32 = [TensorSpec("in", (1, 4), "float32", None, None)]
I8 = [TensorSpec("in", (1, 4), "int8", 0.1, -3)]


def test_synthetic_matches_shapes_and_dtypes() -> None:
    """Synthetic samples have the model's shapes and dtypes and vary between calls."""
    src = SyntheticSource(seed=1)
    a, b = src.next(F32)[0], src.next(F32)[0]
    assert a.shape == (1, 4)
    assert a.dtype == np.float32
    assert not np.array_equal(a, b)
    assert src.next(I8)[0].dtype == np.int8


def test_npy_directory_is_replayed_in_order(tmp_path: Path) -> None:
    """A directory of .npy files yields each sample (stacked ones split) and loops."""
    np.save(tmp_path / "a.npy", np.arange(8, dtype=np.float32).reshape(2, 4))
    np.save(tmp_path / "b.npy", np.full((1, 4), 9, dtype=np.float32))
    src = make_source(f"npy:{tmp_path}")
    got = [src.next(F32, 0)[0].ravel().tolist() for _ in range(4)]  # type: ignore[index]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [9, 9, 9, 9], [0, 1, 2, 3]]


def test_npy_errors(tmp_path: Path) -> None:
    """A missing path, an empty folder and a sample of the wrong size are InputErrors."""
    with pytest.raises(InputError, match="does not exist"):
        NpySource(tmp_path / "nope")
    with pytest.raises(InputError, match=r"no \.npy"):
        NpySource(tmp_path)
    np.save(tmp_path / "c.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(InputError, match="do not split"):
        NpySource(tmp_path).next(F32)


def test_socket_takes_npy_and_raw_datagrams(tmp_path: Path) -> None:
    """Another process sends samples as .npy bytes or raw tensor bytes; bad ones are InputErrors."""
    path = tmp_path / "in.sock"
    src = SocketSource(path)
    try:
        assert src.next(F32, 0.01) is None
        tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        buf = io.BytesIO()
        np.save(buf, np.ones((1, 4), dtype=np.float32))
        tx.sendto(buf.getvalue(), str(path))
        assert src.next(F32, 1.0)[0].tolist() == [[1, 1, 1, 1]]  # type: ignore[index]
        tx.sendto(np.arange(4, dtype="<f4").tobytes(), str(path))
        assert src.next(F32, 1.0)[0].tolist() == [[0, 1, 2, 3]]  # type: ignore[index]
        tx.sendto(b"abc", str(path))
        with pytest.raises(InputError, match="whole number"):
            src.next(F32, 1.0)
        tx.close()
    finally:
        src.close()
    assert not path.exists()


def test_unknown_source() -> None:
    """An unknown source name is an InputError naming the choices."""
    with pytest.raises(InputError, match="synthetic, npy:PATH or socket:PATH"):
        make_source("camera")
