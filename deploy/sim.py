"""``collafuse-sim``: one server and N client processes on loopback, each with its own shard.

The same topology as ``docker compose up``, without Docker: separate OS processes
(forked from a fork server that imported torch once, or plain ``python -m`` subprocesses;
see ``launcher.py``) talking gRPC over 127.0.0.1 on a free port. ``--engine ray`` runs the
clients instead as logical clients multiplexed over a pool of Ray worker actors (``sim_ray.py``),
for runs of hundreds or thousands of clients; the server is the same process either way.
Outputs under ``--out``:

    data/client-<k>/       each client's shard (class sub-folders)
    server/                the server's store (releases, checkpoints, metrics)
    clients/client-<k>/    each client's workdir (ledger, model, samples, metrics)
    logs/*.log             every process's log
    certs/                 with --tls: the development CA, the server's and each client's certificate
    grids/client-<k>.png   server hand-off row above the client-finished row
    loss_curves.png        server and client training losses
    metrics.json           per client and pooled: losses, steps, wall times, bytes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from typing import Protocol as TypingProtocol

import grpc
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import CliVariadicArg
from tqdm import tqdm

from collafuse.common.config import (
    DIGIT_CLASSES,
    AmbientFields,
    AutoencoderFields,
    ClientSettings,
    LocalTimesteps,
    Protocol,
    RuntimeFields,
    ServerSettings,
    SplitFields,
    TrainingFields,
)
from collafuse.common.data import DataError
from collafuse.common.files import read_json
from collafuse.common.images import save_curves
from collafuse.common.runtime import run_cli, setup_logging
from collafuse.common.schedule import Cut, ScheduleFields
from collafuse.common.settings import (
    SECRET_FIELDS,
    CollafuseSettings,
    ConfigError,
    build_settings,
    parse_settings,
    to_cli_args,
)
from collafuse.common.tls import channel_credentials
from collafuse.deploy.healthcheck import check as health_check
from collafuse.deploy.launcher import ChildProcess, Command, LauncherKind, default_launcher, gpu_present
from collafuse.deploy.tls import DevPki, dev_pki
from collafuse.evaluation.data.digits import export_digits
from collafuse.evaluation.data.partition import PartitionScheme, write_shards

log = logging.getLogger("collafuse.sim")


DIGITS_SIDE = 8  # the bundled digits' own size
# --tls: the identity of the simulation's own Status and health calls (an operator: it watches every client).
SIM_IDENTITY = "sim"
LOOPBACK = "127.0.0.1"
TLS_HOSTS = (LOOPBACK, "localhost")
# One OS process per client costs ~0.5 GB once torch is imported: beyond this, --engine ray.
MAX_PROCESS_CLIENTS = 64
# Loss curves drawn in loss_curves.png: a thousand lines would be neither readable nor quick to draw.
MAX_CURVES = 16
# Clients whose grid path is logged at the end (all of them are in <out>/grids).
MAX_LOGGED_GRIDS = 8
Engine = Literal["process", "ray"]


class SimSettings(CollafuseSettings, ScheduleFields, TrainingFields, RuntimeFields, AmbientFields, SplitFields,
                  AutoencoderFields):
    """The simulation's own settings; the schedule, training and runtime fields pass to every process."""

    clients: int = Field(3, ge=1, le=100_000, description=f"number of clients (--engine process: at most "
                         f"{MAX_PROCESS_CLIENTS})")
    engine: Engine = Field("process", description="how the clients run: process (one OS process each) or ray "
                           "(logical clients multiplexed over a pool of Ray worker actors, for hundreds or thousands "
                           "of clients; pip install 'collafuse[ray]')")
    ray_address: str | None = Field(None, description="with --engine ray: join this running Ray cluster ('auto', "
                                    "'HOST:6379' or 'ray://HOST:10001'; --out must be on storage every node sees); "
                                    "unset: start a local Ray")
    ray_workers: int = Field(0, ge=0, description="with --engine ray: worker actors (0: one per CPU of this machine, "
                             "or of the cluster with --ray-address)")
    cut: int = Field(200, ge=0, description="cut point zeta of every client (0 = GM, T = ICM)")
    cuts: CliVariadicArg[list[int]] = Field([], description="per-client cut points, one per client (e.g. --cuts "
                                            "100 200 500); replaces --cut")
    handoff_margin: int = Field(0, ge=0, description="every client's --handoff-margin: its local model also covers "
                                "(cut, cut + margin] and sampling hands off there (nothing more is released)")
    client_local_timesteps: LocalTimesteps = Field("uniform", description="every client's --local-timesteps: how "
                                                   "its local training draws t (uniform, or linear: P(t) "
                                                   "proportional to t)")
    init_from_server: bool = Field(False, description="every client's --init-from-server (the server runs with "
                                   "--share-model): each local model starts from the trained shared model's weights")
    steps: int = Field(1000, ge=0, description="server training steps")
    client_steps: int = Field(500, ge=0, description="local training steps of each client")
    dataset: str = Field("digits", description="'digits' (bundled) or a folder with one sub-folder per class")
    partition: PartitionScheme = Field("classes", description="iid, classes (class groups) or dirichlet")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for --partition dirichlet")
    protocol: Protocol = Field("ambient", description="training protocol: ambient (releases) or split (split learning)")
    out: Path = Field(Path("runs/sim"), description="output folder")
    image_size: int | None = Field(None, ge=4, le=1024, description="served image side (default: the dataset's own, "
                                   f"rounded to one the models take; the bundled digits are {DIGITS_SIDE}x{DIGITS_SIDE})")
    channels: int | None = Field(None, description="served channels, 1 or 3 (default: the dataset's own)")
    server_preset: str = Field("small", description="server UNet preset")
    client_preset: str = Field("tiny", description="client UNet preset")
    samples_per_class: int = Field(4, ge=0, description="images each client generates per class it holds")
    inference_steps: int = Field(100, ge=0, description="sampling chain length (0: all T)")
    guidance_scale: float = Field(1.0, gt=0, description="every client's --guidance-scale: classifier-free guidance "
                                  "of the client's half of the chain, > 0 (1 = plain conditional; 2 evaluates the "
                                  "client's model twice per step)")
    server_guidance_scale: float | None = Field(2.0, gt=0, description="every client's --server-guidance-scale: "
                                                "guidance of the server's half (default 2: where the class is decided, "
                                                "at no client compute; 1 = plain); None (a benchmark's) follows "
                                                "--guidance-scale")
    # Not RuntimeFields' default (0: all cores): N processes share this machine's cores.
    threads: int = Field(1, ge=0, description="torch threads per process (0: torch's default)")
    transcript: bool = Field(False, description="record every payload the server receives in server/transcript.jsonl")
    audit: bool = Field(False, description="privacy audit: record the transcript and, after the run, audit it "
                        "(collafuse-audit: payload checks, reconstruction attacks, disclosure) into audit.json")
    audit_features: Literal["inception", "pixels", "none"] = Field(
        "inception", description="with --audit: features of the disclosure Frechet distance (pixels: fast, no weights)")
    tls: bool = Field(False, description="mutual TLS between every process: a development CA and certificates "
                      "(client-<k>, and 'sim' for the simulation's own calls) in <out>/certs")
    timeout: float = Field(3600.0, gt=0, description="most seconds the whole run may take (also every client's "
                           "--wait-timeout for the server's training)")
    fresh: bool = Field(True, description="delete a previous run's server store and client workdirs first")
    launcher: LauncherKind = Field(default_factory=default_launcher,
                                   description="forkserver: fork the CLIs from one process that imported torch once (the default without "
                                               "a GPU); subprocess: start each CLI as `python -m` (the default on a "
                                               "host with a GPU, as CUDA does not survive a fork; deploy/launcher.py)")

    @model_validator(mode="after")
    def _engine_fits(self) -> SimSettings:
        if self.engine == "process" and self.clients > MAX_PROCESS_CLIENTS:
            raise ValueError(f"--clients {self.clients} with --engine process starts one OS process per client (at "
                             f"most {MAX_PROCESS_CLIENTS}); use --engine ray, which multiplexes logical clients over "
                             "a pool of worker processes (pip install 'collafuse[ray]')")
        if self.engine == "ray" and self.protocol == "split":
            raise ValueError("--engine ray runs the clients in phases, several on one worker, but a split round waits "
                             "for every active client, so clients queued behind each other would stall every round; "
                             "run --protocol split with --engine process")
        return self

    def cut_of(self, k: int) -> int:
        """Client k's cut: its entry of --cuts, else --cut."""
        return self.cuts[k] if self.cuts else self.cut


def _cuts_text(settings: SimSettings) -> str:
    return " ".join(str(c) for c in settings.cuts) if settings.cuts else str(settings.cut)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_image_spec(settings: SimSettings) -> SimSettings:
    """``settings`` with ``image_size`` and ``channels`` filled in: the digits' own, or the dataset folder's
    (rounded to a side both model presets take), saying what was chosen and why."""
    if settings.image_size is not None and settings.channels is not None:
        return settings
    if settings.dataset == "digits":
        side, channels, reason = DIGITS_SIDE, 1, f"the bundled digits are {DIGITS_SIDE}x{DIGITS_SIDE} grey"
    else:
        from collafuse.common.image_spec import infer_image_spec  # reads images: only for a folder

        source = Path(settings.dataset)
        if not source.is_dir():
            raise DataError(f"--dataset {source} is neither 'digits' nor a folder of class sub-folders")
        spec = infer_image_spec(source, [settings.server_preset, settings.client_preset])
        side, channels, reason = spec.side, spec.channels, spec.reason
    updates = {k: v for k, v in (("image_size", side), ("channels", channels)) if getattr(settings, k) is None}
    log.info("serving %s (%s)", ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in updates.items()), reason)
    return settings.model_copy(update=updates)


def prepare_shards(settings: SimSettings) -> tuple[list[Path], list[str]]:
    """Per-client shards of the dataset, and the class names (label order) the server serves."""
    data_root = settings.out / "data"
    if settings.dataset == "digits":
        source = export_digits(data_root / "all", settings.image_size or DIGITS_SIDE)
        classes = list(DIGIT_CLASSES)
    else:
        source = Path(settings.dataset)
        if not source.is_dir():
            raise DataError(f"--dataset {source} is neither 'digits' nor a folder of class sub-folders")
        classes = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"--dataset {source} has no class sub-folders (expected {source}/<class>/*.png)")
    shard_root = data_root / "shards"
    if shard_root.exists():
        shutil.rmtree(shard_root)
    shards = write_shards(source, shard_root, settings.clients, settings.partition, settings.seed, settings.alpha)
    return shards, classes


class SimError(RuntimeError):
    """A process of the simulation failed; the message carries its log tail."""


def _env(settings: SimSettings) -> dict[str, str]:
    # The children's settings are exactly the objects built here: no COLLAFUSE_* of this shell leaks into
    # them, except the secrets, which travel in the environment rather than on a visible command line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAFUSE_")}
    for name in SECRET_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            env[f"COLLAFUSE_{name.upper()}"] = str(value)
    env["HF_HUB_OFFLINE"] = "1"
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    return env


def _shared(settings: SimSettings, *groups: type[BaseModel]) -> dict[str, Any]:
    """The values of the field groups the simulation shares with a child (secrets go by env)."""
    names = [name for group in groups for name in group.model_fields if name not in SECRET_FIELDS]
    return {name: getattr(settings, name) for name in names}


def sim_pki(settings: SimSettings, hosts: Sequence[str] = TLS_HOSTS) -> DevPki | None:
    """--tls: a fresh development CA in <out>/certs, the server's certificate (for ``hosts``) and one per client
    and for the simulation itself (None without --tls)."""
    if not settings.tls:
        return None
    client_ids = [f"client-{k}" for k in range(settings.clients)]
    pki = dev_pki(settings.out / "certs", tuple(dict.fromkeys(hosts)), [*client_ids, SIM_IDENTITY])
    log.info("--tls: every process talks mutual TLS; development CA and certificates in %s", pki.ca.cert.parent)
    return pki


def _tls_pki(settings: SimSettings, pki: DevPki | None) -> DevPki | None:
    if settings.tls and pki is None:
        raise ConfigError("--tls: make the certificates first (sim_pki) and pass them to the settings builders")
    return pki if settings.tls else None


def _sim_credentials(pki: DevPki | None) -> grpc.ChannelCredentials | None:
    """The channel credentials of the simulation's own Status and health calls (its operator certificate)."""
    if pki is None:
        return None
    fields = pki.client_fields(SIM_IDENTITY)
    return channel_credentials(fields["tls_cert"], fields["tls_key"], fields["tls_ca"])


def server_settings(settings: SimSettings, port: int, classes: list[str], pki: DevPki | None = None,
                    host: str = LOOPBACK) -> ServerSettings:
    """The server's settings, built (and so checked) here in the parent; with --tls, ``pki`` (sim_pki)'s; it
    listens on ``host`` (a Ray cluster's clients reach it from other machines)."""
    settings = with_image_spec(settings)
    pki = _tls_pki(settings, pki)
    tls: dict[str, Any] = {**pki.server_fields(), "operators": [SIM_IDENTITY]} if pki else {}
    # Clients at cut T release nothing: the trainer waits only for those that do.
    releasing = sum(settings.cut_of(k) < settings.num_train_timesteps for k in range(settings.clients))
    # --engine ray releases every client's images in one phase before any client trains, and stops the run if one
    # fails: the trainer may wait for all of them however long that takes (minutes for a thousand clients).
    start: dict[str, Any] = {"start_timeout": settings.timeout} if settings.engine == "ray" else {}
    return build_settings(
        ServerSettings,
        **_shared(settings, ScheduleFields, TrainingFields, RuntimeFields, AmbientFields, AutoencoderFields), **tls,
        host=host, port=port, store=settings.out / "server",
        image_size=settings.image_size, channels=settings.channels, classes=classes,
        model_preset=settings.server_preset, max_steps=settings.steps, min_clients=max(1, releasing), **start,
        share_model=settings.init_from_server,
        transcript=settings.out / "server" / "transcript.jsonl" if settings.transcript or settings.audit else None,
    )


def client_settings(settings: SimSettings, k: int, shard: Path, port: int, pki: DevPki | None = None,
                    server_host: str = LOOPBACK) -> ClientSettings:
    """Client k's settings, built (and so checked) here in the parent; its seed is the run's seed + k; with
    --tls, its certificate from ``pki`` (sim_pki); it reaches the server at ``server_host``."""
    pki = _tls_pki(settings, pki)
    return build_settings(
        ClientSettings,
        **{**_shared(settings, TrainingFields, RuntimeFields, SplitFields, AutoencoderFields), "seed": settings.seed + k},
        **(pki.client_fields(f"client-{k}") if pki else {}),
        data=shard, server=f"{server_host}:{port}", client_id=f"client-{k}",
        workdir=settings.out / "clients" / f"client-{k}", cut=settings.cut_of(k), protocol=settings.protocol,
        handoff_margin=settings.handoff_margin,
        model_preset=settings.client_preset, train_steps=settings.client_steps,
        local_timesteps=settings.client_local_timesteps,
        # A client at cut T has no server steps to wait for, and so no trained shared model to start from.
        init_from_server=settings.init_from_server and Cut(settings.cut_of(k), settings.num_train_timesteps).server_steps,
        samples_per_class=settings.samples_per_class, inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance_scale, server_guidance_scale=settings.server_guidance_scale,
        # An independent client model needs nothing from the server's training.
        wait_for_server=Cut(settings.cut_of(k), settings.num_train_timesteps).server_steps,
        # A client waits for the server's training as long as the run may take: with the client's own default
        # (30 min) a long server training (GM at 13,200 steps on 2 cores) outlived every client.
        wait_timeout=settings.timeout,
        # The simulation's schedule is its clients' own: their noise floor is the cut under it.
        reference_timesteps=settings.num_train_timesteps, reference_beta_start=settings.beta_start,
        reference_beta_end=settings.beta_end, reference_beta_schedule=settings.beta_schedule,
    )


def server_command(settings: SimSettings, port: int, classes: list[str], pki: DevPki | None = None,
                   host: str = LOOPBACK) -> Command:
    return Command("collafuse.server.cli", to_cli_args(server_settings(settings, port, classes, pki, host)))


def client_command(settings: SimSettings, k: int, shard: Path, port: int, pki: DevPki | None = None) -> Command:
    return _client_cli(client_settings(settings, k, shard, port, pki))


def _client_cli(client: ClientSettings) -> Command:
    return Command("collafuse.client.cli", ["run", *to_cli_args(client)])


def server_status(port: int, credentials: grpc.ChannelCredentials | None = None) -> dict[str, Any] | None:
    """The server's trainer (phase, step, max_steps, loss) from a Status call on loopback; None if it did not answer."""
    from collafuse.common.enums import phase_name
    from collafuse.common.rpc import open_channel
    from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

    try:
        with open_channel(f"{LOOPBACK}:{port}", credentials=credentials) as channel:
            reply = collafuse_pb2_grpc.CollaFuseStub(channel).Status(collafuse_pb2.StatusRequest(), timeout=5)
    except grpc.RpcError:
        return None
    trainer = reply.trainer
    return {"phase": phase_name(trainer.phase), "step": trainer.step, "max_steps": trainer.max_steps, "loss": trainer.last_loss}


def _wait_healthy(server: ChildProcess, port: int, timeout: float,
                  credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SimError(f"the server exited with code {server.poll()}:\n{server.tail()}")
        if health_check(f"{LOOPBACK}:{port}", timeout=2.0, credentials=credentials):
            return
        time.sleep(0.5)
    raise SimError(f"the server did not become healthy within {timeout:.0f}s:\n{server.tail()}")


def _watch(server: ChildProcess, clients: list[ChildProcess], port: int, settings: SimSettings,
           credentials: grpc.ChannelCredentials | None = None) -> None:
    """Progress bar over the server's training; fail fast when a process dies."""
    deadline = time.monotonic() + settings.timeout
    bar = tqdm(total=max(settings.steps, 1), desc="server training", unit="step", dynamic_ncols=True)
    try:
        while True:
            running = [c for c in clients if c.poll() is None]
            failed = [c for c in clients if c.poll() not in (None, 0)]
            if failed:
                raise SimError("\n".join(f"{c.name} exited with code {c.poll()}:\n{c.tail()}" for c in failed))
            if server.poll() is not None:
                raise SimError(f"the server exited early with code {server.poll()}:\n{server.tail()}")
            status = server_status(port, credentials)
            if status and (status["step"] != bar.n or not running):
                show_status(bar, status, clients_left=len(running))
            if not running:
                return
            if time.monotonic() > deadline:
                raise SimError(f"the run exceeded --timeout {settings.timeout:.0f}s")
            time.sleep(1.0)
    finally:
        bar.close()


def show_status(bar: tqdm, status: dict[str, Any], **postfix: Any) -> None:
    """The server's training step and loss (``server_status``) on a progress bar."""
    bar.n = min(status["step"], bar.total)
    # One refresh per update: set_postfix would draw the bar a second time.
    bar.set_postfix(phase=status["phase"], loss=f"{status['loss']:.4f}", **postfix, refresh=False)
    bar.refresh()


class ClientEngine(TypingProtocol):
    """How the simulation runs its clients; everything else about a run (shards, server, outputs) is shared."""

    name: str
    bind_host: str  # where the server listens
    client_host: str  # where the clients reach it

    def run_clients(self, clients: Sequence[ClientSettings], server: ChildProcess, port: int,
                    credentials: grpc.ChannelCredentials | None) -> dict[str, Any]:
        """Run every client to its end, failing fast (SimError); what metrics.json records under "engine"."""
        ...

    def close(self) -> None:
        """Free what the engine holds (its clients are stopped already)."""
        ...


class ProcessEngine:
    """One OS process per client (launcher.py), each running ``collafuse-client run`` with its own log."""

    name = "process"
    bind_host = LOOPBACK
    client_host = LOOPBACK

    def __init__(self, settings: SimSettings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env

    def run_clients(self, clients: Sequence[ClientSettings], server: ChildProcess, port: int,
                    credentials: grpc.ChannelCredentials | None) -> dict[str, Any]:
        logs = self.settings.out / "logs"
        processes: list[ChildProcess] = []
        try:
            for client in clients:
                processes.append(ChildProcess(client.client_id or "client", _client_cli(client),
                                              logs / f"{client.client_id}.log", self.env, self.settings.launcher))
            _watch(server, processes, port, self.settings, credentials)
        finally:
            for proc in processes:
                proc.stop()
        return {"name": self.name, "launcher": self.settings.launcher, "failed_clients": 0}

    def close(self) -> None:
        pass


def open_engine(settings: SimSettings) -> ClientEngine:
    """The engine of --engine; Ray is imported (and started or joined) only for --engine ray."""
    if settings.engine == "ray":
        from collafuse.deploy.sim_ray import RayEngine

        return RayEngine(settings)
    return ProcessEngine(settings, _env(settings))


def collect(settings: SimSettings, wall: float, shards: list[Path], engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json, grids and loss curves from the processes' outputs."""
    server_metrics = read_json(settings.out / "server" / "metrics.json")
    clients: dict[str, Any] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    if server_metrics.get("losses"):
        curves["server"] = [(float(x), float(y)) for x, y in server_metrics["losses"]]
    grids = settings.out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    for k in range(settings.clients):
        name = f"client-{k}"
        workdir = settings.out / "clients" / name
        metrics = read_json(workdir / "metrics.json")
        clients[name] = metrics
        if metrics.get("local_losses") and k < MAX_CURVES:
            curves[name] = [(float(x), float(y)) for x, y in metrics["local_losses"]]
        grid = workdir / "samples" / "grid.png"
        if grid.is_file():
            shutil.copyfile(grid, grids / f"{name}.png")
    shown = f", first {MAX_CURVES} of {settings.clients} clients" if settings.clients > MAX_CURVES else ""
    save_curves(settings.out / "loss_curves.png", curves, f"training loss (cuts {_cuts_text(settings)}{shown})")

    def total(key: str) -> int:
        return int(sum(int(m.get(key, 0) or 0) for m in clients.values()))

    engine = engine or {"name": settings.engine}
    pooled = {
        "clients": settings.clients,
        "engine": engine["name"],
        "images": total("num_images"),
        "bytes_sent": total("bytes_sent"),
        "bytes_received": total("bytes_received"),
        "client_train_steps": total("local_train_steps"),
        "server_train_steps": server_metrics.get("step", 0),
        "wall_seconds": wall,
    }
    summary = {
        "settings": json.loads(settings.model_dump_json()),
        "shards": {f"client-{k}": str(p) for k, p in enumerate(shards)},
        "server": server_metrics,
        "clients": clients,
        "pooled": pooled,
        "engine": engine,
    }
    (settings.out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` below stops every child process."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_audit(settings: SimSettings) -> dict[str, Any]:
    """collafuse-audit on the finished run (audit.json, audit.png, audit_grid.png in --out); its headline numbers."""
    from collafuse.evaluation.audit.cli import AuditError, audit_run, build_parser
    from collafuse.evaluation.audit.transcript import TranscriptError

    # The attacker's chains run as long as the run's own sampling chain (--inference-steps).
    args = build_parser().parse_args([str(settings.out), "--features", settings.audit_features, "--seed", str(settings.seed),
                                      "--chain-steps", str(settings.inference_steps)]
                                     + (["--autoencoder", str(settings.autoencoder)] if settings.autoencoder else []))
    try:
        result = audit_run(args)
    except (AuditError, TranscriptError) as exc:
        raise SimError(f"the run finished but its privacy audit failed: {exc}") from exc
    headline = {
        "audit_json": str(settings.out / "audit.json"),
        "groups": [
            {"client_id": g["client_id"], "protocol": g.get("protocol", "ambient"), "cut": g["cut"],
             "best_attack": (g.get("best_actual") or {}).get("attack"),
             "best_psnr_db": (g.get("best_actual") or {}).get("psnr_db"),
             "less_noisy_than_declared": g["noise_check"]["less_noisy_than_declared"],
             "raw_findings": len(g["raw_findings"])}
            for g in result["groups"]
        ],
        "unexpected_tensors": len(result["unexpected_tensors"]),
    }
    (settings.out / "metrics.json").write_text(json.dumps({**read_json(settings.out / "metrics.json"), "audit": headline},
                                                          indent=2, default=str))
    return headline


def run(settings: SimSettings) -> dict[str, Any]:
    if settings.launcher == "forkserver" and (settings.device == "cuda" or (settings.device == "auto" and gpu_present())):
        raise ConfigError(f"--launcher forkserver cannot start processes that use the GPU (--device {settings.device} "
                          "here): CUDA does not work in a child forked from a process that touched it. Use --launcher "
                          "subprocess (the default on a host with a GPU), or --device cpu")
    if settings.cuts and len(settings.cuts) != settings.clients:
        raise ConfigError(f"--cuts gives {len(settings.cuts)} cut(s) for --clients {settings.clients}: give one per client")
    for k in range(settings.clients):
        if not 0 <= settings.cut_of(k) <= settings.num_train_timesteps:
            raise ConfigError(f"cut {settings.cut_of(k)} of client-{k} is outside [0, T = {settings.num_train_timesteps}]")
    if settings.fresh:
        for sub in ("server", "clients", "logs", "grids"):
            shutil.rmtree(settings.out / sub, ignore_errors=True)
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    settings = with_image_spec(settings)
    shards, classes = prepare_shards(settings)
    port = free_port()
    logs = settings.out / "logs"
    if 0 in (settings.cut_of(k) for k in range(settings.clients)):
        log.warning("cut 0 is the global-model baseline: every client releases its raw images to the server")
    engine = open_engine(settings)
    server: ChildProcess | None = None
    try:
        pki = sim_pki(settings, (*TLS_HOSTS, engine.client_host))
        credentials = _sim_credentials(pki)
        clients = [client_settings(settings, k, shard, port, pki, engine.client_host) for k, shard in enumerate(shards)]
        log.info("starting the server on %s:%d and %d clients (cut %s, --engine %s)", engine.bind_host, port,
                 settings.clients, _cuts_text(settings), engine.name)
        server = ChildProcess("server", server_command(settings, port, classes, pki, engine.bind_host),
                              logs / "server.log", _env(settings), settings.launcher)
        _wait_healthy(server, port, timeout=120, credentials=credentials)
        engine_report = engine.run_clients(clients, server, port, credentials)
    finally:
        if server is not None:
            server.stop()
        engine.close()
    summary = collect(settings, time.monotonic() - started, shards, engine_report)
    if settings.audit:
        summary["audit"] = run_audit(settings)
    log.info("done in %.0fs: %s", summary["pooled"]["wall_seconds"], settings.out / "metrics.json")
    for k in range(min(settings.clients, MAX_LOGGED_GRIDS)):
        log.info("samples of client-%d: %s", k, settings.out / "grids" / f"client-{k}.png")
    if settings.clients > MAX_LOGGED_GRIDS:
        log.info("... and of the other %d clients in %s", settings.clients - MAX_LOGGED_GRIDS, settings.out / "grids")
    return summary


def main(argv: list[str] | None = None) -> int:
    setup_logging("INFO", "sim")
    _terminate_on_sigterm()

    def body() -> int:
        settings = parse_settings(SimSettings, sys.argv[1:] if argv is None else argv, prog="collafuse-sim",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        setup_logging(settings.log_level, "sim")
        run(settings)
        return 0

    return run_cli(body, (ConfigError, DataError, SimError))


if __name__ == "__main__":
    raise SystemExit(main())
