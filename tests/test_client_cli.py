"""collafuse-client: bad input gives one plain line and exit status 2, and nothing stored is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from client_fake_server import FakeServer, closed_port, make_image_folder

from collafuse.client.cli import main
from collafuse.client.ledger import Ledger

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cli(monkeypatch, restore_logging):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


def test_missing_and_empty_data_folders(tmp_path, capsys):
    code, _, err = _run(capsys, "--data", str(tmp_path / "nope"), "--server", "127.0.0.1:1", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "release", "--data", str(tmp_path / "empty"), "--server", "127.0.0.1:1", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "holds no images" in err
    code, _, err = _run(capsys, "run", "--server", "127.0.0.1:1", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "no --data given" in err


def test_unreachable_server_is_a_plain_message_after_retries(tmp_path, capsys):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=1)
    target = f"127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    code, _, err = _run(capsys, "--data", str(tmp_path / "data"), "--server", target, "--retries", "2",
                        "--workdir", str(tmp_path / "w"))
    assert code == 2 and time.perf_counter() - started < 15
    [line] = _errors(err)
    assert target in line and "did not answer after 2 attempts" in line and "Traceback" not in err


def test_unknown_class_unreadable_image_and_wrong_size(tmp_path, capsys):
    with FakeServer() as fake:
        make_image_folder(tmp_path / "unknown", classes=("0", "7"), per_class=1)
        code, _, err = _run(capsys, "register", "--data", str(tmp_path / "unknown"), "--server", fake.target,
                            "--workdir", str(tmp_path / "w1"))
        assert code == 2 and "server rejected Register (INVALID_ARGUMENT): unknown classes ['7']" in err

        bad = make_image_folder(tmp_path / "bad", classes=("0",), per_class=1)
        (bad / "0" / "broken.png").write_bytes(b"this is not a png")
        code, _, err = _run(capsys, "release", "--cut", "20", "--data", str(bad), "--server", fake.target, "--workdir", str(tmp_path / "w2"))
        assert code == 2 and "cannot read image" in err and "broken.png" in err
        assert fake.servicer.transcript == []

        make_image_folder(tmp_path / "ok", classes=("0",), per_class=1)
        code, _, err = _run(capsys, "release", "--cut", "20", "--data", str(tmp_path / "ok"), "--server", fake.target,
                            "--image-size", "16", "--workdir", str(tmp_path / "w3"))
        assert code == 2 and "--image-size 16 does not match the server, which serves 8x8" in err


def test_bad_settings_and_reset_without_confirmation(tmp_path, capsys):
    code, _, err = _run(capsys, "--cut", "-3", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "invalid settings: cut" in err
    code, _, err = _run(capsys, "reset", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "pass --yes" in err


def test_release_status_forget_and_ledger_subcommands_keep_the_ledger(tmp_path, capsys):
    make_image_folder(tmp_path / "data", classes=("0", "1"), per_class=2)
    work = tmp_path / "w"
    common = ["--data", str(tmp_path / "data"), "--workdir", str(work), "--client-id", "alice", "--cut", "20"]
    with FakeServer() as fake:
        assert _run(capsys, "release", "--server", fake.target, *common)[0] == 0
        code, out, _ = _run(capsys, "status", "--server", fake.target, *common)
        status = json.loads(out)
        assert code == 0 and status["server"]["server_id"] == "fake-server" and status["ledger"]["releases"] == 4
        assert _run(capsys, "forget", "--server", fake.target, *common)[0] == 0
        code, _, err = _run(capsys, "release", "--server", fake.target, *common)
        assert code == 2 and "--re-release-confirm" in err
        code, _, err = _run(capsys, "release", "--server", fake.target, *common, "--client-id", "bob")
        assert code == 2 and "belongs to client 'alice'" in err
    code, out, _ = _run(capsys, "ledger", *common)
    assert code == 0 and json.loads(out)["releases"] == 4 and json.loads(out)["forgets"] == 1
    with Ledger(work) as ledger:
        assert ledger.client_id() == "alice" and len(ledger.releases()) == 4


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLLAFUSE_WORKDIR": str(tmp_path / "w")}
    proc = subprocess.run(
        [sys.executable, "-m", "collafuse.client", "--data", str(tmp_path / "missing"), "--server", "127.0.0.1:1"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(_errors(proc.stderr)) == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "w" / "ledger.sqlite").is_file()  # env vars reach the settings
