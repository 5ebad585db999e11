"""Data-parallel server training (server/distributed.py): two gloo ranks on the CPU each hold half of the
releases, keep identical replicas and end where one process ends with the same global minibatch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from client_fake_server import make_image_folder
from server_support import SHAPE, tiny_settings, wait_phase

from collafuse.common.rpc import open_channel
from collafuse.server import distributed
from collafuse.server.app import STOP_MARGIN_S
from collafuse.server.cli import GRACE_S
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import (
    NewRelease,
    Partition,
    ReleaseRows,
    ReleaseTable,
    ambient_source,
)
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


def rank_main(rank: int, root: str, port: int) -> None:
    """One torchrun-like rank: rank 0 runs the server's Trainer on the store, rank 1 follows."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    world = distributed.World.from_env()
    settings = tiny_settings(Path(root) / "store", **SETTINGS)
    device = distributed.start(world, settings)
    try:
        if rank == 0:
            trainer = Trainer(settings, fill(settings.store), "fp", device=device, poll_interval=0.02)
            distributed.lead(trainer, world)
            trainer.start()
            assert trainer.wait_done(120)
            trainer.stop()
            core, held = trainer.core, trainer.source.inner.x_cut  # type: ignore[attr-defined]
        else:
            core, source = distributed.follow(settings, world, device)
            held = source.x_cut
        torch.save({"model": state(core.model), "ema": state(core.ema.model), "losses": core.losses,
                    "step": core.step, "held": held.clone()}, Path(root) / f"rank{rank}.pt")
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
    store = fill(single_root)
    trainer = Trainer(tiny_settings(single_root, **SETTINGS), store, "fp", device=CPU, poll_interval=0.02)
    # One process holding every row, drawing the minibatch as two ranks do (half from each part).
    trainer.source.partition = Partition(2)  # type: ignore[attr-defined]
    trainer.start()
    assert trainer.wait_done(120)
    trainer.stop()
    single = {"model": state(trainer.core.model), "ema": state(trainer.core.ema.model), "losses": trainer.core.losses}
    rows = ReleaseTable(store).load().x_cut
    return {"ranks": ranks, "single": single, "root": root, "rows": rows}


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


def test_each_rank_holds_only_its_half_of_the_releases(runs: dict[str, Any]) -> None:
    rows = runs["rows"]
    assert rows.shape[0] == 24
    for rank, saved in enumerate(runs["ranks"]):
        assert torch.equal(saved["held"], rows[rank::2]), f"rank {rank} holds rows {rank}, {rank + 2}, ... only"


def rows_main(rank: int, root: str, port: int) -> None:
    """Rank 0 sends three loads (a full one, new rows, and everything again after a forget); rank 1 takes them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    world = distributed.World.from_env()
    settings = tiny_settings(Path(root) / "store")
    device = distributed.start(world, settings)
    try:
        channel = distributed.Channel(world, device)
        source = ambient_source(settings, None, device, 3, Partition(2, rank))
        loads = [(release_rows(10, 0), True), (release_rows(5, 10), False), (release_rows(5, 100), True)]
        for rows, full in loads:
            if rank == 0:
                channel.send_rows(rows, full, 0 if full else len(source))
                source.take(rows, full)
            else:
                op, args = channel.receive()
                assert op == distributed.Op.ROWS
                source.take(*channel.receive_rows(args, len(source)))
            if rank == 1 and not full:
                assert torch.equal(source.x_cut, torch.cat([loads[0][0].x_cut, rows.x_cut])[1::2])
        torch.save({"held": source.x_cut.clone(), "labels": source.labels.clone(), "rows": len(source)},
                   Path(root) / f"rows{rank}.pt")
    finally:
        distributed.shutdown()


def release_rows(n: int, start: int) -> ReleaseRows:
    gen = torch.Generator().manual_seed(start)
    return ReleaseRows(torch.randn((n, *SHAPE), generator=gen), (torch.arange(n) + start) % 3,
                       torch.full((n,), 10), ["c"] * n, start + n, start + 1, 0 if start < 100 else 1)


def test_a_forget_reshards_every_rank_from_scratch(tmp_path: Path) -> None:
    """After a forget rank 0 sends the whole table again: rank 1 drops what it held (the forgotten client's
    rows with it) and keeps its half of what is left; labels and cuts of every row reach every rank."""
    mp.spawn(rows_main, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    after_forget = release_rows(5, 100)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rows{rank}.pt")
        assert saved["rows"] == 5 and torch.equal(saved["labels"], after_forget.labels)
        assert torch.equal(saved["held"], after_forget.x_cut[rank::2]), f"rank {rank}"


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
    # The client's 8 releases are sharded: rank 1 held 4 of them.
    assert f"rank 1: rank 0 stopped training at step {CLI_STEPS} (it held 4 of 8 releases)" in log, log[-4000:]
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
