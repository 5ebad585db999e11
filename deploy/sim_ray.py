"""``collafuse-sim --engine ray``: logical clients multiplexed over a pool of Ray worker actors.

The process engine gives every client its own OS process, about half a gigabyte each once torch is
imported, so one machine runs a few dozen. Here each worker actor imports torch once and runs logical
clients one after another through the ``ClientLifecycle`` the client CLI drives, each with its own
``ClientSettings`` (built by ``sim.client_settings``, as for a client process): its own workdir (ledger,
model, samples, metrics.json), client id, seed, certificate with ``--tls``, log file, and its own gRPC
connection to the real server process that ``sim.run`` starts.

Clients queued behind each other on one actor cannot all wait for the server at once, so the run goes in
phases, each over every client:

1. join: scan the shard, Register, load the images, contribute (the releases);
2. train: local training, offline from the setup cached at Register (the server trains meanwhile);
3. the driver waits once for the server's training (a Status poll);
4. generate: Heartbeat (the training is done: it returns at once), Sample, the client's half of the
   chain, the samples and the client's metrics.json.

Split learning is refused (``SimSettings``): a split round waits for every active client.

Ray starts locally (one CPU per worker actor) unless ``--ray-address`` joins a running cluster; then
the server listens on every interface of this node, the clients reach it at this node's IP, the actors
spread over the nodes, and ``--out`` must be on storage every node sees (shards and workdirs are paths).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from tqdm import tqdm

from collafuse.client.lifecycle import ClientLifecycle
from collafuse.common.config import ClientSettings
from collafuse.common.settings import ConfigError
from collafuse.deploy.launcher import ChildProcess
from collafuse.deploy.sim import LOOPBACK, SimError, SimSettings, server_status, show_status

log = logging.getLogger("collafuse.sim.ray")

Phase = Literal["join", "train", "generate"]
# Calls queued per actor: the next client is there when one finishes, without a round trip to the driver.
IN_FLIGHT_PER_WORKER = 2
# Seconds the actors may take to start (each imports torch) or to be placed on a busy cluster.
WORKER_START_TIMEOUT = 300.0
# The small payloads here (settings, outcomes) need little of Ray's shared-memory object store.
OBJECT_STORE_BYTES = 128 * 1024 * 1024
SERVER_POLL_SECONDS = 1.0
LOG_TAIL_LINES = 15
CLIENT_LOG_FORMAT = "%(asctime)s %(levelname)s [{name}] %(message)s"


@dataclass(frozen=True)
class ClientOutcome:
    """One logical client's phase, as its worker reports it."""

    client_id: str
    phase: str
    seconds: float
    error: str | None = None  # "ExceptionType: message" when the phase raised


def _join(client: ClientLifecycle) -> None:
    client.scan()  # a bad shard fails before the server is contacted
    client.register()
    client.load_data()
    client.contribute()


def _train(client: ClientLifecycle) -> None:
    client.train()


def _generate(client: ClientLifecycle) -> None:
    client.server_info(allow_cached=True)  # the setup cached at Register: no second Register
    client.wait_for_server()
    client.generate()
    wall = client.report.data["wall_seconds"]
    # The client's own phases, as a client process's total: not the time it spent queued on its actor.
    wall["total"] = round(sum(v for k, v in wall.items() if k != "total"), 4)


PHASES: dict[Phase, Callable[[ClientLifecycle], None]] = {"join": _join, "train": _train, "generate": _generate}


class ClientWorker:
    """The body of one Ray worker actor (``ray.remote`` wraps it in ``RayEngine``): runs one logical client's
    phase at a time in this process, which imported torch once for all of them."""

    def __init__(self, threads: int, log_level: str) -> None:
        import torch

        if threads > 0:  # the simulation's default is 1: the actors and the server share the cores
            torch.set_num_threads(threads)
        logging.getLogger().setLevel(getattr(logging, log_level.upper(), logging.INFO))

    def ready(self) -> str:
        """Where this actor runs (the driver waits for every actor before the first phase)."""
        return f"{os.uname().nodename}:{os.getpid()}"

    def run(self, phase: Phase, settings: ClientSettings, log_path: str) -> ClientOutcome:
        """``phase`` of the client ``settings`` describes; its log goes to ``log_path``, as a client process's."""
        name = settings.client_id or "client"
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter(CLIENT_LOG_FORMAT.format(name=name), datefmt="%H:%M:%S"))
        root = logging.getLogger()
        root.addHandler(handler)
        started = time.perf_counter()
        try:
            with ClientLifecycle(settings, show_progress=False) as client:
                PHASES[phase](client)
        except Exception as exc:  # reported to the driver, which fails the run with the client's name
            log.exception("%s failed in phase %s", name, phase)
            return ClientOutcome(name, phase, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
        finally:
            root.removeHandler(handler)
            handler.close()
        return ClientOutcome(name, phase, time.perf_counter() - started)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--engine ray needs Ray, which is not installed: pip install 'collafuse[ray]' "
                          "(or run with --engine process)") from exc
    return ray


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    return "\n".join(f"    {ln}" for ln in path.read_text(errors="replace").splitlines()[-lines:])


class RayEngine:
    """Starts or joins Ray, holds the worker actors, and runs every client through the phases."""

    name = "ray"

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.ray = _import_ray()
        self.actors: list[Any] = []
        self._started_ray = not self.ray.is_initialized()  # a caller's own Ray session is left running
        if self._started_ray:
            self._init_ray()
        try:
            if settings.ray_address is None:
                self.bind_host = self.client_host = LOOPBACK
            else:
                # Clients on other nodes reach the server at this node's address; it listens on every interface.
                self.bind_host = "0.0.0.0"
                self.client_host = str(self.ray.util.get_node_ip_address())
                if settings.token is None and not settings.tls:
                    log.warning("the server listens on every interface of %s with neither --token nor --tls: anyone "
                                "on the cluster's network may join it", self.client_host)
            cpus = int(self.ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            self.workers = settings.ray_workers or max(1, cpus)
            remote = self.ray.remote(num_cpus=1)(ClientWorker)
            # Created now, so that they import torch while the server starts.
            self.actors = [remote.options(scheduling_strategy="SPREAD").remote(settings.threads, settings.log_level)
                           for _ in range(self.workers)]
        except BaseException:
            self.close()
            raise

    def _init_ray(self) -> None:
        s = self.settings
        env = {"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(s.threads)} if s.threads else {})}
        options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
        if s.ray_address is None:
            options.update(num_cpus=max(s.ray_workers, os.cpu_count() or 1), include_dashboard=False,
                           object_store_memory=OBJECT_STORE_BYTES)
            log.info("starting a local Ray (%d CPUs)", options["num_cpus"])
        else:
            options.update(address=s.ray_address)
            log.info("joining the Ray cluster at %s", s.ray_address)
        self.ray.init(**options)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._started_ray:
            self.ray.shutdown()

    def _wait_ready(self) -> None:
        try:
            where = self.ray.get([a.ready.remote() for a in self.actors], timeout=WORKER_START_TIMEOUT)
        except self.ray.exceptions.GetTimeoutError:
            cpus = self.ray.cluster_resources().get("CPU", 0)
            raise SimError(f"the {self.workers} Ray worker actors (one CPU each) did not all start within "
                           f"{WORKER_START_TIMEOUT:.0f}s; the cluster has {cpus:.0f} CPUs: lower --ray-workers") from None
        log.info("%d Ray worker actors ready (%s)", len(where), ", ".join(sorted({w.split(":")[0] for w in where})))

    def run_clients(self, clients: Sequence[ClientSettings], server: ChildProcess, port: int,
                    credentials: grpc.ChannelCredentials | None) -> dict[str, Any]:
        deadline = time.monotonic() + self.settings.timeout
        self._wait_ready()
        seconds: dict[str, float] = {}
        busy: dict[str, float] = {}
        for phase in ("join", "train"):
            seconds[phase], busy[phase] = self._phase(phase, clients, server, deadline)
        began = time.monotonic()
        if any(c.wait_for_server for c in clients):
            self._wait_for_server(server, port, credentials, deadline)
        seconds["server_training"] = round(time.monotonic() - began, 3)
        seconds["generate"], busy["generate"] = self._phase("generate", clients, server, deadline)
        return {"name": self.name, "address": self.settings.ray_address, "workers": self.workers,
                "failed_clients": 0, "phase_seconds": seconds, "client_seconds": busy}

    def _phase(self, phase: Phase, clients: Sequence[ClientSettings], server: ChildProcess,
               deadline: float) -> tuple[float, float]:
        """``phase`` of every client over the actors; (wall seconds, the clients' summed seconds). Fails fast:
        after the first failure no client starts, the ones running finish, and SimError names the failed ones."""
        began = time.monotonic()
        logs = self.settings.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        queue = deque(clients)
        running: dict[Any, tuple[int, str]] = {}  # object ref -> (actor index, client id)
        failed: list[ClientOutcome] = []
        busy = 0.0

        def submit(actor: int) -> None:
            client = queue.popleft()
            name = client.client_id or "client"
            ref = self.actors[actor].run.remote(phase, client, str(logs / f"{name}.log"))
            running[ref] = (actor, name)

        for actor in range(len(self.actors)):
            for _ in range(IN_FLIGHT_PER_WORKER):
                if queue:
                    submit(actor)
        with tqdm(total=len(clients), desc=f"clients: {phase}", unit="client", dynamic_ncols=True) as bar:
            while running:
                done, _ = self.ray.wait(list(running), num_returns=1, timeout=SERVER_POLL_SECONDS)
                for ref in done:
                    actor, name = running.pop(ref)
                    try:
                        outcome: ClientOutcome = self.ray.get(ref)
                    except self.ray.exceptions.RayError as exc:  # the actor itself died (killed, out of memory)
                        outcome = ClientOutcome(name, phase, 0.0, f"its Ray worker failed: {exc}")
                    busy += outcome.seconds
                    bar.update(1)
                    if outcome.error is not None:
                        failed.append(outcome)
                        queue.clear()  # fail fast: no further client starts
                        bar.set_postfix(failed=len(failed), refresh=False)
                    elif queue:
                        submit(actor)
                if server.poll() is not None:
                    raise SimError(f"the server exited with code {server.poll()} during the clients' {phase} phase:\n"
                                   f"{server.tail()}")
                if time.monotonic() > deadline:
                    raise SimError(f"the run exceeded --timeout {self.settings.timeout:.0f}s in the clients' {phase} "
                                   f"phase ({bar.n} of {len(clients)} done)")
        if failed:
            first = failed[0]
            raise SimError(f"{len(failed)} client(s) failed in phase {phase} ({', '.join(f.client_id for f in failed)}); "
                           f"the run stopped there. {first.client_id}: {first.error}\n"
                           f"{_tail(logs / f'{first.client_id}.log')}")
        wall = round(time.monotonic() - began, 3)
        log.info("phase %s: %d clients in %.1fs on %d workers", phase, len(clients), wall, len(self.actors))
        return wall, round(busy, 3)

    def _wait_for_server(self, server: ChildProcess, port: int, credentials: grpc.ChannelCredentials | None,
                         deadline: float) -> None:
        """Once for every client: until the server's trainer is done (the clients' generate needs its model)."""
        with tqdm(total=max(self.settings.steps, 1), desc="server training", unit="step", dynamic_ncols=True) as bar:
            while True:
                if server.poll() is not None:
                    raise SimError(f"the server exited early with code {server.poll()}:\n{server.tail()}")
                status = server_status(port, credentials)
                if status is not None:
                    show_status(bar, status)
                    if status["phase"] == "done":
                        return
                if time.monotonic() > deadline:
                    raise SimError(f"the run exceeded --timeout {self.settings.timeout:.0f}s waiting for the server's "
                                   "training")
                time.sleep(SERVER_POLL_SECONDS)
