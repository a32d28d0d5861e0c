"""Ctrl-C while `rollout push` is still connecting to follow its rollout detaches, never aborts."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FOLLOW = """
import sys
from publisher.bus import BrokerAddress
from publisher.cli import _follow
print("following", flush=True)
sys.exit(_follow(BrokerAddress(port=int(sys.argv[1])), "r-1", as_json=False, timeout=60))
"""


def test_sigint_while_the_bus_waits_for_connack_exits_130() -> None:
    """A broker that accepts but never answers CONNACK: SIGINT then detaches with 130, not 'Aborted!'."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-c", FOLLOW, str(port)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "following"
        conn, _ = silent.accept()  # the bus's TCP connection is up; its CONNECT goes unanswered
        with conn:
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "detached: rollout r-1 keeps running" in err
