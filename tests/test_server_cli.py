"""collafuse-server: a plain error line and exit 2 for bad set-ups, a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collafuse.server.cli import main

TINY = ["--host", "127.0.0.1", "--device", "cpu", "--image-size", "8", "--model-preset", "tiny",
        "--num-train-timesteps", "50", "--threads", "1"]


def test_bad_settings_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    assert main(["--store", str(tmp_path), "--channels", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "channels must be 1 (grey) or 3 (RGB)" in lines[0]


def test_port_in_use_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--store", str(tmp_path), "--port", str(port), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"port {port} is in use: pick another --port or stop the other process" in err
    assert "Traceback" not in err
    assert not (tmp_path / "server.json").exists()


def test_process_serves_until_sigterm(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "collafuse.server", "--store", str(tmp_path), "--port", "0", *TINY]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server_file = tmp_path / "server.json"
    try:
        deadline = time.monotonic() + 120
        while not server_file.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        info = json.loads(server_file.read_text())
        assert info["pid"] == proc.pid and info["port"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"CollaFuse server listening on 127.0.0.1:{info['port']} (device cpu)" in err
    assert "received SIGTERM" in err and "server stopped" in err
    assert not server_file.exists()


def test_unusable_schedule_is_refused_at_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    # The NaN guard: alpha_bar_1 would round to 1 in float32 and the ambient weight would be NaN.
    assert main(["--store", str(tmp_path), "--beta-start", "1e-8"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "alpha_bar_1 rounds to 1.0" in lines[0] and "raise beta_start" in lines[0]
    assert not (tmp_path / "server.json").exists()
