"""Data-parallel server training (server/distributed.py): two gloo ranks on the CPU keep identical replicas
and end where one process ends with the same global minibatch, for the ambient protocol's source and for a
source the wrapper knows nothing about."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from client_fake_server import make_image_folder
from server_support import tiny_settings, wait_phase

from collafuse.common.config import TrainOptions
from collafuse.common.models import build_unet
from collafuse.common.rpc import open_channel
from collafuse.common.train_loop import TrainCore, seeded
from collafuse.server import distributed
from collafuse.server.app import STOP_MARGIN_S
from collafuse.server.cli import GRACE_S
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import NewRelease, ReleaseTable
from collafuse.server.protocols.base import TrainingSource
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

CPU = torch.device("cpu")
STEPS = 3
SETTINGS: dict[str, Any] = {"max_steps": STEPS, "batch_size": 8, "checkpoint_every": 2, "lr": 1e-3}


def fill(root: Path) -> ReleaseStore:
    """The same releases of two clients at different cuts in every store made here."""
    store = ReleaseStore(root, store_tables())
    for client, cut, seed in (("alice", 10, 0), ("bob", 30, 1)):
        store.register_client(client, cut, collafuse_pb2.PROTOCOL_AMBIENT, ["a", "b", "c"], "fp")
        gen = torch.Generator().manual_seed(seed)
        ReleaseTable(store).add(client, cut, [
            NewRelease.of(f"{client}{i}", i % 3, torch.randn((1, 8, 8), generator=gen)) for i in range(12)
        ])
    return store


def state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def join(rank: int, port: int) -> distributed.World:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    return distributed.World.from_env()


def rank_main(rank: int, root: str, port: int) -> None:
    """One torchrun-like rank: rank 0 runs the server's Trainer on the store, rank 1 follows."""
    torch.set_num_threads(1)
    world = join(rank, port)
    settings = tiny_settings(Path(root) / "store", **SETTINGS)
    device = distributed.start(world, settings)
    try:
        if rank == 0:
            trainer = Trainer(settings, fill(settings.store), "fp", device=device, poll_interval=0.02)
            distributed.lead(trainer, world)
            trainer.start()
            assert trainer.wait_done(120)
            trainer.stop()
            core = trainer.core
        else:
            core = distributed.follow(settings, world, device)
        torch.save({"model": state(core.model), "ema": state(core.ema.model), "losses": core.losses,
                    "step": core.step}, Path(root) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)))  # type: ignore[arg-type]
    norm = torch.sqrt(sum((x ** 2).sum() for x in a))  # type: ignore[arg-type]
    return float(diff / norm)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_main, args=(str(root), free_port()), nprocs=2, join=True)
    ranks = [torch.load(root / f"rank{r}.pt") for r in (0, 1)]
    single_root = tmp_path_factory.mktemp("single") / "store"
    trainer = Trainer(tiny_settings(single_root, **SETTINGS), fill(single_root), "fp", device=CPU, poll_interval=0.02)
    trainer.start()
    assert trainer.wait_done(120)
    trainer.stop()
    single = {"model": state(trainer.core.model), "ema": state(trainer.core.ema.model), "losses": trainer.core.losses}
    return {"ranks": ranks, "single": single, "root": root}


def test_replicas_are_identical_after_training(runs: dict[str, Any]) -> None:
    zero, one = runs["ranks"]
    assert zero["step"] == one["step"] == STEPS
    for part in ("model", "ema"):
        assert all(torch.equal(a, b) for a, b in zip(zero[part], one[part], strict=True)), part
    assert zero["losses"] == one["losses"], "every rank logs the loss averaged over the ranks"
    assert (runs["root"] / "store" / "checkpoints" / "latest").is_dir(), "rank 0 checkpoints as one process does"


def test_two_ranks_equal_one_process_with_the_same_global_batch(runs: dict[str, Any]) -> None:
    zero, single = runs["ranks"][0], runs["single"]
    moved = relative(single["model"], [torch.zeros_like(p) for p in single["model"]])
    assert moved > 0
    # Not bit-equal: one mean over 8 rows against the mean of two means over 4 sums in another order, and
    # Adam's first steps magnify that for near-zero gradients (measured: 7e-7 with one thread).
    assert relative(single["model"], zero["model"]) < 2e-6
    assert relative(single["ema"], zero["ema"]) < 2e-6
    for (s1, v1), (s2, v2) in zip(single["losses"], zero["losses"], strict=True):
        assert s1 == s2 and v1 == pytest.approx(v2, rel=1e-5)


# ---- the wrapper around a source it knows nothing about ----------------------------------------------------

@dataclass(frozen=True)
class PairBatch:
    """Another protocol's batch: inputs at fixed t, per-row targets on the CPU, and a non-tensor field."""

    inputs: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    scale: float


class PairSource(TrainingSource[PairBatch]):
    """A regression source (denoise towards fixed targets): the loss a mean over rows, no draws in it."""

    def __init__(self, rows: int = 40) -> None:
        gen = torch.Generator().manual_seed(11)
        self.x = torch.randn((rows, 1, 8, 8), generator=gen)
        self.y = torch.roll(self.x, 1, dims=-1)

    def refresh(self) -> bool:
        return False

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def client_ids(self) -> list[str]:
        return ["c"]

    def batch(self, generator: torch.Generator) -> PairBatch:
        idx = torch.randint(len(self), (8,), generator=generator)
        t = torch.randint(1, 50, (8,), generator=generator)
        return PairBatch(self.x[idx], t, idx % 3, self.y[idx], 0.5)

    def loss(self, net: Any, batch: PairBatch, generator: torch.Generator) -> torch.Tensor:
        assert batch.targets.device == CPU
        return batch.scale * ((net(batch.inputs, batch.t, batch.labels) - batch.targets) ** 2).mean()


def pair_core() -> TrainCore:
    model = seeded(0, lambda: build_unet("tiny", (1, 8, 8), 3))
    return TrainCore(model, TrainOptions(lr=1e-2, ema_decay=0.9), CPU)


def pair_main(rank: int, root: str, port: int) -> None:
    """Rank 0 drives a PairSource through the wrapper; rank 1 trains on the shards it is sent."""
    torch.set_num_threads(1)
    world = join(rank, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        core = pair_core()
        channel = distributed.Channel(world, CPU)
        distributed.replicate(core, world, channel)
        if rank == 0:
            source = distributed.LeaderSource(PairSource(), world, channel)
            for _ in range(STEPS):
                core.train_step(source.batch, source.loss)
            channel.send(distributed.Op.STOP)
        else:
            replica = PairSource(0)
            while channel.receive()[0] == distributed.Op.STEP:
                core.train_step(lambda _g: channel.receive_batch(), replica.loss)
        torch.save(state(core.model), Path(root) / f"pair{rank}.pt")
    finally:
        distributed.shutdown()


def test_any_training_source_trains_data_parallel_as_one_process(tmp_path: Path) -> None:
    """The wrapper shards a batch type it has never seen (tensor rows cut, the float copied, the CPU targets
    kept on the CPU) and both ranks end at the weights of one process stepping on the whole batches."""
    mp.spawn(pair_main, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"pair{r}.pt") for r in (0, 1))
    single, half, source = pair_core(), pair_core(), PairSource()
    for _ in range(STEPS):
        single.train_step(source.batch, source.loss)
        # What a rank gets that trains on its own shard only, without the average over ranks.
        half.train_step(lambda g: distributed.shard_rows(source.batch(g), 0, 2), source.loss)
    assert all(torch.equal(a, b) for a, b in zip(zero, one, strict=True))
    # Float sums in another order (Adam magnifies them on its first steps): 1.2e-6 measured; a rank that
    # misses the other's shard is more than 1e-3 away.
    assert relative(state(single.model), zero) < 1e-5
    assert relative(state(half.model), zero) > 1e-3


# ---- torchrun through the real CLI, with a real client -----------------------------------------------------

CLI_STEPS = 10
TORCHRUN = Path(sys.executable).with_name("torchrun")


def wait_until(condition: Any, what: str, timeout: float, proc: subprocess.Popen[str], log: Path) -> None:
    """Poll ``condition`` until true; fails at once when ``proc`` has exited (with its log)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"torchrun exited {proc.returncode} before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent's pid)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s running children: torchrun's ranks (Linux /proc; they run in sessions of their own)."""
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [c for c in pids if (fields := _stat(c)) is not None and int(fields[1]) == pid]


def running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.slow
def test_torchrun_cli_trains_for_a_real_client_and_stops_on_sigterm(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m collafuse.server.cli``: rank 0 serves a real client, both ranks train
    to --max-steps, and SIGTERM to torchrun ends every rank within the grace period."""
    store, port = tmp_path / "store", free_port()
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server_cmd = [
        str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "collafuse.server.cli", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--store", str(store), "--max-steps", str(CLI_STEPS), "--checkpoint-every", "5", "--batch-size", "4",
        "--min-clients", "1", "--image-size", "8", "--channels", "1", "--model-preset", "tiny",
        "--num-train-timesteps", "50", "--classes", "a", "b", "--threads", "1",
    ]
    client_cmd = [
        sys.executable, "-m", "collafuse.client", "run", "--data", str(tmp_path / "data"),
        "--server", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "work"), "--cut", "20",
        "--train-steps", "3", "--batch-size", "4", "--samples-per-class", "1", "--inference-steps", "5",
        "--device", "cpu", "--threads", "1", "--wait-timeout", "120", "--rpc-timeout", "10",
    ]
    server_log, client_log = tmp_path / "server.log", tmp_path / "client.log"
    with open(server_log, "w") as slog, open(client_log, "w") as clog:
        server = subprocess.Popen(server_cmd, stdout=slog, stderr=subprocess.STDOUT, text=True, env=env)
        client: subprocess.Popen[str] | None = None
        ranks: list[int] = []
        try:
            wait_until((store / "server.json").exists, "rank 0 serving", 90, server, server_log)
            ranks = children(server.pid)
            assert len(ranks) == 2, ranks
            client = subprocess.Popen(client_cmd, stdout=clog, stderr=subprocess.STDOUT, text=True, env=env)
            client.wait(timeout=120)
            assert client.returncode == 0, client_log.read_text()[-4000:]
            api = collafuse_pb2_grpc.CollaFuseStub(open_channel(f"127.0.0.1:{port}"))
            status = wait_phase(api, "done", timeout=60)
            assert status.trainer.step == CLI_STEPS
            wait_until(lambda: json.loads((store / "metrics.json").read_text())["step"] == CLI_STEPS
                       if (store / "metrics.json").exists() else False, "the final checkpoint", 30, server, server_log)
            assert server.poll() is None, "rank 0 still serves after training ends"
            started = time.monotonic()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"torchrun hung on SIGTERM:\n{server_log.read_text()[-4000:]}")
            took = time.monotonic() - started
            left = [r for r in ranks if running(r)]
        finally:
            # torchrun killed outright leaves its ranks running (each in a session of its own): kill them too.
            leftover = set(ranks) | set(children(server.pid) if server.poll() is None else [])
            for proc in (client, server):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for rank in leftover:
                if running(rank):
                    os.kill(rank, signal.SIGKILL)
    log = server_log.read_text()
    assert "rank 0 leads 2 data-parallel ranks" in log and "rank 1 follows rank 0" in log, log[-4000:]
    assert f"rank 1: rank 0 stopped training at step {CLI_STEPS}" in log, log[-4000:]
    assert "server stopped" in log, log[-4000:]
    # Within rank 0's own bound plus torchrun's polling; torchrun SIGKILLs ranks only after 30 s.
    assert took < GRACE_S + STOP_MARGIN_S + 5, f"SIGTERM to torchrun took {took:.1f}s"
    assert not left, f"ranks still running after torchrun exited: {left}"
    # torchrun answers SIGTERM with exit 1 (its agent raises SignalException) whatever its ranks do; a rank
    # that failed shows as torchrun's ChildFailedError.
    assert server.returncode in (0, 1) and "ChildFailedError" not in log, log[-4000:]
    metrics = json.loads((store / "metrics.json").read_text())
    assert [int(s) for s, _ in metrics["losses"]] == list(range(1, CLI_STEPS + 1))
    assert (tmp_path / "work" / "samples" / "grid.png").is_file()
