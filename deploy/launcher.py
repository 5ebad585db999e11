"""Child processes of ``collafuse-sim``: the server and client CLIs, each with its own log file.

Two ways to start one, with the same result (a separate OS process running the CLI's ``main``
with its own address space, talking to the others only over gRPC):

``subprocess``
    ``python -m <module> <args>``, exactly what a shell or a container runs.
``forkserver`` (default where the platform has it and there is no GPU: CUDA does not survive a fork)
    forked from the standard library's multiprocessing fork server, which imports torch,
    diffusers and the caller's main module once. A fresh interpreter spends ~10 CPU-seconds
    importing them (torch, then diffusers' own imports of torch._dynamo, scipy.stats and
    transformers); the data-scarce study starts 11 processes per arm on 2 cores, so that alone
    was a third of its wall time. The fork server is a fresh interpreter (not a fork of the
    caller); before forking it creates no gRPC channel or server and runs no torch computation,
    so each child builds its own gRPC and intra-op thread pools (``tests/test_launcher.py``
    checks a forked child computes on two threads; the e2e tests' simulations serve gRPC from
    forked children). As with any multiprocessing
    program, a script that starts a simulation needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

LauncherKind = Literal["forkserver", "subprocess"]

# Imported once by the fork server (the CLIs pull in torch and diffusers). "__main__" imports the
# caller's script there too, so that children do not each re-import it (multiprocessing's
# start-up does that otherwise).
PRELOAD = ["__main__", "collafuse.server.cli", "collafuse.client.cli", "collafuse.deploy.sim"]


def preload() -> list[str]:
    """PRELOAD without the module that already is ``__main__`` (``python -m collafuse.deploy.sim``): a child
    re-runs its parent's main module under its own name at start-up, and finding it imported under that
    name already makes runpy warn once per child."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    return [m for m in PRELOAD if main is None or m != main.name]


def gpu_present() -> bool:
    """Whether torch sees a CUDA GPU here (the simulation's processes then take it: ``--device auto``)."""
    import torch

    return bool(torch.cuda.is_available())


def default_launcher() -> LauncherKind:
    """forkserver where the platform has it, except on a host with a GPU: CUDA cannot be used in a forked child
    once the parent has touched it, and importing torch's and diffusers' modules in the fork server does (torch
    then refuses CUDA in every child: "Cannot re-initialize CUDA in forked subprocess", seen on an H200)."""
    if "forkserver" not in multiprocessing.get_all_start_methods() or gpu_present():
        return "subprocess"
    return "forkserver"


@dataclass(frozen=True)
class Command:
    """A CLI to run: ``module`` has a ``main(argv) -> int``, as ``python -m module args`` would call it."""

    module: str
    args: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


def _child_main(command: Command, log_path: str, env: dict[str, str]) -> None:
    """Runs in the forked child: log to the file on fds 1 and 2, take the environment, call the CLI."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  # lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    # The fork server ignores SIGINT; a CLI expects the default (KeyboardInterrupt) like any process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [command.module, *command.args]
    code = importlib.import_module(command.module).main(command.args)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


class ChildProcess:
    """One child process with its log file, started by either launcher."""

    def __init__(self, name: str, command: Command, log_path: Path, env: dict[str, str],
                 launcher: LauncherKind = "subprocess") -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        self._popen: subprocess.Popen[bytes] | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._log: IO[str] | None = None
        if launcher == "forkserver":
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(preload())
            self._process = context.Process(target=_child_main, args=(command, str(log_path), env), name=name, daemon=False)
            self._process.start()
        else:
            self._log = log_path.open("a")
            self._popen = subprocess.Popen(command.argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else self._process.pid if self._process else None

    def poll(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal), else None."""
        if self._popen is not None:
            return self._popen.poll()
        assert self._process is not None
        return self._process.exitcode

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(f"    {ln}" for ln in text[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the CLIs shut down gracefully on it), then SIGKILL after ``timeout`` seconds."""
        if self._popen is not None:
            if self._popen.poll() is None:
                self._popen.send_signal(signal.SIGTERM)
                try:
                    self._popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait()
        elif self._process is not None and self._process.exitcode is None:
            self._process.terminate()
            self._process.join(timeout)
            if self._process.exitcode is None:
                self._process.kill()
                self._process.join()
        if self._log is not None:
            self._log.close()
