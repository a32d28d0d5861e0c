"""The walking skeleton, for real: a broker, two agent processes, signed rollouts, results back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from publisher.modelgen import ModelSpec, build_model, reference_output
from schemas import openssl_ed25519
from tests.device.conftest import Rig, make_manifest, sha_file


def test_two_agents_commit_a_signed_rollout_and_report_results(rig: Rig) -> None:
    """Two agent processes fetch, verify, gate and activate v1 then v2, and stream their outputs."""
    spec1 = ModelSpec(input_size=4, output_size=3, seed=1, pad_to=40_000)
    x = np.linspace(-1, 1, 4 * 5, dtype=np.float32).reshape(5, 4)
    np.save(rig.tmp / "inputs.npy", x)
    a = rig.agent("dev-a", groups=("lab",)).start()
    b = rig.agent("dev-b", groups=("lab",), source=f"npy:{rig.tmp / 'inputs.npy'}").start()
    for dev in ("dev-a", "dev-b"):
        rig.observer.wait(lambda d=dev: rig.observer.of(d, "birth"), 30, f"{dev} birth")

    model1 = build_model(spec1)
    m1 = make_manifest(model1, "1.0", spec=spec1)
    assert m1.chunk_count > 8
    rig.deploy(model1, m1, group="lab")
    for agent in (a, b):
        state = rig.observer.wait_state(agent.device, "SUCCEEDED", m1.rollout_id)
        assert state.model_version == "1.0"
        assert sha_file(agent.state_dir / "models" / "active.tflite") == m1.model_sha256

    # dev-b reads known inputs, so its outputs can be checked against numpy.
    batches = rig.observer.wait(lambda: rig.observer.results_for("dev-b", "1.0"), 20, "dev-b results")
    got = np.array(batches[0].outputs[0], dtype=np.float32)
    assert np.allclose(got, reference_output(spec1, x[0]).ravel(), atol=1e-5)
    rig.observer.wait(lambda: rig.observer.results_for("dev-a", "1.0"), 20, "dev-a results")

    spec2 = ModelSpec(input_size=4, output_size=3, seed=2, bias_add=1.0, pad_to=40_000)
    model2 = build_model(spec2)
    m2 = make_manifest(model2, "2.0", spec=spec2)
    rig.deploy(model2, m2, group="lab")
    for agent in (a, b):
        rig.observer.wait_state(agent.device, "SUCCEEDED", m2.rollout_id)
        assert sha_file(agent.state_dir / "models" / "active.tflite") == m2.model_sha256
        assert sha_file(agent.state_dir / "models" / "previous.tflite") == m1.model_sha256
    batches = rig.observer.wait(lambda: rig.observer.results_for("dev-b", "2.0"), 20, "dev-b v2 results")
    outputs = np.array(batches[-1].outputs, dtype=np.float32)
    expected = reference_output(spec2, x)
    assert any(np.allclose(row, expected[i], atol=1e-5) for row in outputs for i in range(len(x)))

    # Every report carries a growing version number, and health reports the new model.
    for dev in ("dev-a", "dev-b"):
        numbers = [s.version_number for s in rig.observer.of(dev, "state")]
        assert numbers == sorted(numbers)
        rig.observer.wait(
            lambda d=dev: [h for h in rig.observer.of(d, "health") if h.model_version == "2.0"], 10, "health"
        )
    # One fleet, one transfer: no chunk crossed the broker more than twice per version.
    assert sum(rig.chunks.sent.values()) <= 2 * (m1.chunk_count + m2.chunk_count)
    for dev in ("dev-a", "dev-b"):
        counters = rig.observer.of(dev, "health")[-1].counters
        assert counters.get("chunks_stored") == m1.chunk_count + m2.chunk_count
        assert not any(
            k.startswith("chunks_") and k not in {"chunks_stored", "chunks_received"} for k in counters
        )
    # Two signed rollouts later the agent process still has no pydantic in it: it reads and writes
    # its messages with schemas/plain.py (docs/device.md, "Measured"). Nor cryptography, where the
    # libcrypto hashlib maps can check Ed25519 itself (schemas/openssl_ed25519.py; the same here as
    # in the agents, which run this interpreter).
    system_openssl = openssl_ed25519.load() is not None
    for agent in (a, b):
        assert agent.proc is not None
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        assert ("cryptography" in maps) is not system_openssl
        if system_openssl:
            assert "_ctypes" in maps  # the signature check did run in this process
