"""``collafuse-sim``'s child processes: both launchers run a CLI's ``main`` the same way."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from collafuse.common.settings import ConfigError
from collafuse.deploy import launcher as launcher_module
from collafuse.deploy import sim as sim_module
from collafuse.deploy.launcher import ChildProcess, Command, LauncherKind
from collafuse.deploy.sim import SimSettings

LAUNCHERS: list[LauncherKind] = ["forkserver", "subprocess"]


def _wait(child: ChildProcess, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while (code := child.poll()) is None:
        assert time.monotonic() < deadline, f"{child.name} did not finish:\n{child.tail()}"
        time.sleep(0.05)
    return code


def _env() -> dict[str, str]:
    # the child must see this environment, not the one the fork server started with
    env = dict(os.environ, LAUNCHER_TEST="yes")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_child_computes_on_its_threads_and_logs_to_its_file(tmp_path: Path, launcher: LauncherKind) -> None:
    child = ChildProcess("compute", Command("launcher_child", ["compute", str(tmp_path / "out.json"), "2"]),
                         tmp_path / "logs" / "compute.log", _env(), launcher)
    assert _wait(child) == 0, child.tail()
    info = json.loads((tmp_path / "out.json").read_text())
    assert info == {"threads": 2, "finite": True, "pid": child.pid, "env": "yes", "argv0": info["argv0"]}
    assert info["pid"] != os.getpid()
    log = (tmp_path / "logs" / "compute.log").read_text()
    assert "computed on 2 threads" in log and "stdout line" in log
    child.stop()


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_exit_codes_and_sigterm_reach_the_parent(tmp_path: Path, launcher: LauncherKind) -> None:
    failing = ChildProcess("exit", Command("launcher_child", ["exit", str(tmp_path / "x"), "3"]),
                           tmp_path / "exit.log", _env(), launcher)
    assert _wait(failing) == 3 and "failing on purpose" in failing.tail()
    waiting = ChildProcess("wait", Command("launcher_child", ["wait", str(tmp_path / "state")]), tmp_path / "wait.log", _env(),
                           launcher)
    deadline = time.monotonic() + 120
    while not (tmp_path / "state").is_file():
        assert time.monotonic() < deadline and waiting.poll() is None, waiting.tail()
        time.sleep(0.05)
    waiting.stop(timeout=30)
    assert waiting.poll() == 0 and (tmp_path / "state").read_text() == "terminated"


def test_a_host_with_a_gpu_starts_its_children_as_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA does not work in a child forked from a process that touched it, and the fork server's imports do
    (seen on an H200: every child failed with "Cannot re-initialize CUDA in forked subprocess")."""
    monkeypatch.setattr(launcher_module, "gpu_present", lambda: True)
    assert launcher_module.default_launcher() == "subprocess"
    assert SimSettings().launcher == "subprocess"
    monkeypatch.setattr(launcher_module, "gpu_present", lambda: False)
    assert launcher_module.default_launcher() == "forkserver"  # this platform (Linux) has a fork server


@pytest.mark.parametrize("device,gpu", [("cuda", False), ("auto", True)])
def test_an_explicit_fork_server_is_refused_for_gpu_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              device: str, gpu: bool) -> None:
    """Refused before anything starts or is written, with what to use instead."""
    monkeypatch.setattr(sim_module, "gpu_present", lambda: gpu)
    settings = SimSettings(launcher="forkserver", device=device, out=tmp_path / "run", clients=1)
    with pytest.raises(ConfigError, match="--launcher forkserver cannot start processes that use the GPU.*subprocess"):
        sim_module.run(settings)
    assert not (tmp_path / "run").exists()
