"""``collafuse-sim --engine ray``: logical clients multiplexed over Ray worker actors, each with its own workdir,
ledger, identity and gRPC calls to the real server process (issue 20)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from client_fake_server import make_image_folder
from server_support import CLASSES as SERVER_CLASSES
from server_support import start

from collafuse.client.ledger import Ledger
from collafuse.common.config import ClientSettings
from collafuse.common.data import DataError, save_png
from collafuse.common.enums import phase_name
from collafuse.common.settings import ConfigError, parse_settings
from collafuse.deploy import sim_ray
from collafuse.deploy.sim import SimError, SimSettings
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.data.partition import partition

CLIENTS = 6
CLASSES = ["0", "1", "2", "3"]


@pytest.fixture(autouse=True)
def _no_collafuse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("COLLAFUSE_")]:
        monkeypatch.delenv(name)


def _digits_folder(root: Path, per_class: int = 6) -> Path:
    images, labels = digits_arrays(8)
    for c in CLASSES:
        for i in np.flatnonzero(labels == int(c))[:per_class]:
            save_png(images[i], root / c / f"{i:04d}.png")
    return root


def test_the_process_engine_refuses_more_clients_than_it_can_start() -> None:
    with pytest.raises(ConfigError, match="--clients 65 with --engine process.*use --engine ray"):
        parse_settings(SimSettings, ["--clients", "65"])
    assert parse_settings(SimSettings, ["--clients", "65", "--engine", "ray"]).clients == 65
    assert parse_settings(SimSettings, ["--clients", "64"]).engine == "process"


def test_the_ray_engine_refuses_split_learning() -> None:
    with pytest.raises(ConfigError, match="split round waits for every active client.*--engine process"):
        parse_settings(SimSettings, ["--engine", "ray", "--protocol", "split"])


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'collafuse\[ray\]'"):
        sim_ray.RayEngine(SimSettings(engine="ray", out=tmp_path))


def test_more_iid_clients_than_images_is_a_clear_error() -> None:
    labels = np.arange(5) % 2
    assert [len(p) for p in partition(labels, 5, "iid")] == [1] * 5
    with pytest.raises(DataError, match="6 clients but only 5 images.*at most 5 clients"):
        partition(labels, 6, "iid")


@pytest.fixture
def _root_log_level() -> Iterator[None]:
    level = logging.getLogger().level  # a ClientWorker sets the process's level, as a worker process would
    yield
    logging.getLogger().setLevel(level)


@pytest.mark.usefixtures("_root_log_level")
def test_a_worker_runs_logical_clients_phase_by_phase(tmp_path: Path) -> None:
    """The actor's body without Ray: two clients joined, trained, then generated on one worker, each phase in
    a fresh lifecycle on the client's own workdir; a failing client is reported with its name, not raised."""
    server = start(tmp_path / "store", max_steps=3, min_clients=2)
    try:
        clients = [ClientSettings(data=make_image_folder(tmp_path / f"data-{k}", classes=SERVER_CLASSES[:2], per_class=2,
                                                         seed=k),
                                  server=server.address, workdir=tmp_path / f"client-{k}", client_id=f"client-{k}",
                                  cut=20, train_steps=2, batch_size=4, inference_steps=10, samples_per_class=1,
                                  retries=2, rpc_timeout=30, seed=k, device="cpu")
                   for k in range(2)]
        worker = sim_ray.ClientWorker(threads=1, log_level="INFO")

        def run(phase: sim_ray.Phase) -> list[sim_ray.ClientOutcome]:
            return [worker.run(phase, c, str(tmp_path / f"{c.client_id}.log")) for c in clients]

        assert [o.error for o in run("join") + run("train")] == [None] * 4
        deadline = time.monotonic() + 120
        while phase_name(server.trainer.state().phase) != "done":
            assert time.monotonic() < deadline, "the server did not finish its 3 steps"
            time.sleep(0.1)
        assert [(o.client_id, o.phase, o.error) for o in run("generate")] == [
            ("client-0", "generate", None), ("client-1", "generate", None)]
        for c in clients:
            metrics = json.loads((c.workdir / "metrics.json").read_text())
            # One Register (generate reused the setup cached at join), every step of the lifecycle recorded.
            assert metrics["rpc"]["Register"]["calls"] == 1 and metrics["local_train_steps"] == 2
            assert metrics["num_images"] == 4 and metrics["server_trainer_step"] == 3
            assert set(metrics["wall_seconds"]) >= {"register", "contribute", "train", "generate", "total"}
            assert np.load(c.workdir / "samples" / "samples.npy").shape == (2, 1, 8, 8)
            assert "registered as " + str(c.client_id) in (tmp_path / f"{c.client_id}.log").read_text()

        missing = clients[0].model_copy(update={"data": tmp_path / "nowhere", "client_id": "client-9",
                                                "workdir": tmp_path / "client-9"})
        outcome = worker.run("join", missing, str(tmp_path / "client-9.log"))
        assert outcome.client_id == "client-9" and outcome.error is not None and "DataError" in outcome.error
    finally:
        server.stop(0)


class _FakeRay:
    """What RayEngine._phase uses of Ray: an object ref is the finished outcome itself, finished in order."""

    class exceptions:  # as ray.exceptions
        RayError = RuntimeError

    @staticmethod
    def wait(refs: list[object], num_returns: int, timeout: float) -> tuple[list[object], list[object]]:
        return refs[:num_returns], refs[num_returns:]

    @staticmethod
    def get(ref: object) -> object:
        return ref


class _Actor:
    def __init__(self, started: list[str], failing: str) -> None:
        def run(phase: str, settings: ClientSettings, log_path: str) -> sim_ray.ClientOutcome:
            started.append(str(settings.client_id))
            error = "ClientError: refused" if settings.client_id == failing else None
            return sim_ray.ClientOutcome(str(settings.client_id), phase, 0.5, error)

        self.run = type("Method", (), {"remote": staticmethod(run)})()


class _Server:
    def poll(self) -> int | None:
        return None

    def tail(self) -> str:
        return ""


def test_a_failed_client_stops_the_phase_and_is_named(tmp_path: Path) -> None:
    """Fail fast: after client-3 fails, no client starts (client-7 never does), the ones running finish, and the
    error names the failed client and shows its log."""
    started: list[str] = []
    engine = object.__new__(sim_ray.RayEngine)  # its phase scheduling only: no Ray, no actors
    engine.settings = SimSettings(engine="ray", out=tmp_path, timeout=60)
    engine.ray = _FakeRay
    engine.actors = [_Actor(started, failing="client-3"), _Actor(started, failing="client-3")]
    clients = [ClientSettings(client_id=f"client-{k}") for k in range(8)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "client-3.log").write_text("the last line of client-3's log\n")
    with pytest.raises(SimError, match=r"(?s)1 client\(s\) failed in phase train \(client-3\).*ClientError: refused"
                                       r".*the last line of client-3's log"):
        engine._phase("train", clients, _Server(), deadline=time.monotonic() + 60)  # type: ignore[arg-type]
    assert "client-7" not in started and len(started) == 7
    started.clear()
    _, busy = engine._phase("join", clients[4:], _Server(), deadline=time.monotonic() + 60)  # type: ignore[arg-type]
    assert started == [f"client-{k}" for k in range(4, 8)] and busy == 2.0


# ~50 s on 2 cores (Ray's start, three processes importing torch): in `make test-faults`, which CI runs.
@pytest.mark.slow
def test_six_logical_clients_on_two_ray_workers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--engine", "ray", "--clients", str(CLIENTS), "--ray-workers", "2", "--dataset",
            str(_digits_folder(tmp_path / "digits")), "--partition", "iid", "--out", str(out), "--steps", "6",
            "--client-steps", "2", "--batch-size", "4", "--server-preset", "tiny", "--samples-per-class", "1",
            "--inference-steps", "5", "--seed", "3", "--timeout", "600"]
    done = subprocess.run([sys.executable, "-m", "collafuse.deploy.sim", *argv], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["engine"]["name"] == "ray" and metrics["engine"]["workers"] == 2
    assert metrics["engine"]["failed_clients"] == 0 and metrics["pooled"]["engine"] == "ray"
    names = [f"client-{k}" for k in range(CLIENTS)]
    for k, name in enumerate(names):
        workdir = out / "clients" / name
        shard = len(list((out / "data" / "shards" / name).rglob("*.png")))
        client = metrics["clients"][name]
        # Its own identity, seed and data: the ledger pins this client's id and holds one release per image.
        assert client["client_id"] == name and client["num_images"] == shard > 0
        assert client["local_train_steps"] == 2 and client["contribution"]["sent"] == shard
        with Ledger(workdir) as ledger:
            assert ledger.client_id(None) == name
            assert sum(ledger.release_counts().values()) == shard
        assert np.isfinite(np.load(workdir / "samples" / "samples.npy")).all()
        assert set(client["rpc"]) >= {"Register", "Release", "Heartbeat", "Sample"}
        assert "registered as " + name in (out / "logs" / f"{name}.log").read_text()
        assert (out / "grids" / f"{name}.png").is_file()

    with sqlite3.connect(out / "server" / "releases.sqlite") as store:
        registered = sorted(r[0] for r in store.execute("SELECT client_id FROM clients"))
        held = dict(store.execute("SELECT client_id, COUNT(*) FROM releases GROUP BY client_id").fetchall())
    assert registered == sorted(names)
    assert held == {name: metrics["clients"][name]["num_images"] for name in names}
    # The server trained after every client had released (the phases), then each client sampled from it.
    server = metrics["server"]
    assert server["clients_with_releases"] == CLIENTS and server["step"] == 6
    assert all(metrics["clients"][n]["server_trainer_step"] == 6 for n in names)
