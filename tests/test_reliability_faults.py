"""Issue 16 with real server processes on loopback (``make test-faults`` runs these; slow).

- A full disk (the store and the transcript on a 64 MB tmpfs, filled up by a file): Release and Register answer RESOURCE_EXHAUSTED
  with a retry hint and a message naming the disk; Heartbeat and Status keep answering; the trainer keeps
  training through failed checkpoint saves (Status counts them), leaves no temporary folder, saves as soon as
  space is back, and saves its last step on SIGTERM. Needs root to mount the tmpfs: skipped outside CI without
  it, failed in CI (which runs as root).
- A Release stream cancelled, or past its deadline, after 3 valid chunks stores nothing, 10 runs of each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from fault_support import store_rows
from server_support import chunks, register, upload
from test_faults import address, api_at, server_process, wait_for

from collafuse.common import checkpoint
from collafuse.common.rpc import RETRY_AFTER_KEY
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
Code = grpc.StatusCode
pytestmark = pytest.mark.slow


@contextmanager
def small_disk(folder: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (root only)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        reason = "mounting a tmpfs for the disk-full test needs root"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the disk-full test: {reason}")
        pytest.skip(reason)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=False,
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def top_up(filler: Path) -> int:
    """Append whole pages to ``filler`` until the disk refuses one; returns the bytes written.

    Page-sized writes at page-aligned offsets either land whole or fail, so 0 means not one page was free."""
    page = os.sysconf("SC_PAGE_SIZE")
    block, written = b"\0" * page, 0
    with open(filler, "ab", buffering=0) as fh:
        try:
            while fh.write(block) == page:
                written += page
        except OSError:
            pass
    return written


def fill(disk: Path, settle_s: float = 1.0) -> Path:
    """Fill ``disk`` and return the filler file (delete it to free the space).

    The server's trainer saves checkpoints all the while: a save that fails frees what it had written, and a
    save that worked prunes an older one. So top up until two top-ups ``settle_s`` apart (longer than a save
    takes to fail) find not one page free: by then no save holds space it could give back."""
    filler = disk / "filler"
    deadline, quiet = time.monotonic() + 60, 0
    while quiet < 2:
        quiet = quiet + 1 if top_up(filler) == 0 else 0
        assert time.monotonic() < deadline, "the disk did not stay full for 2 top-ups in a row within 60s"
        if quiet < 2:
            time.sleep(settle_s)
    return filler


def status(api: object) -> collafuse_pb2.StatusReply:
    return api.Status(collafuse_pb2.StatusRequest(), timeout=10)  # type: ignore[attr-defined, no-any-return]


def test_a_full_disk_is_an_answer_and_the_trainer_survives_it(tmp_path: Path) -> None:
    # The store is the tmpfs itself (a tiny-model checkpoint is ~10 MB: two kept plus one being written fit);
    # the server's log goes beside it, off the full disk.
    with small_disk(tmp_path / "store") as disk:
        store = disk
        args = ("--max-steps", "0", "--checkpoint-every", "5", "--keep-checkpoints", "2",
                "--transcript", str(disk / "transcript.jsonl"))
        with server_process(store, *args) as proc:
            api = api_at(address(store))
            register(api, "c1", cut=20)
            assert upload(api, chunks("c1", 20, 6, 3)).stored == 6
            wait_for(lambda: status(api).trainer.saved_step >= 5, "a first checkpoint")
            filler = fill(disk)
            # The disk is full: refusals with a hint, never UNKNOWN; liveness and monitoring still answer.
            for call, request in (
                (api.Release, iter(list(chunks("c1", 20, 4, 2, prefix="late")))),
                (api.Register, collafuse_pb2.RegisterRequest(client_id="c2", cut=20, class_names=["a"],
                                                             protocol=collafuse_pb2.PROTOCOL_AMBIENT)),
            ):
                try:
                    if call is api.Release:
                        from collafuse.client.connection import end_of_stream

                        call(end_of_stream(request), timeout=30)  # type: ignore[arg-type]
                    else:
                        call(request, timeout=30)
                    pytest.fail("a call that must write succeeded on a full disk")
                except grpc.RpcError as exc:
                    assert exc.code() == Code.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
                    assert "disk is full or failing" in (exc.details() or "")
                    assert int(dict(exc.trailing_metadata() or ())[RETRY_AFTER_KEY]) > 0
            api.Heartbeat(collafuse_pb2.HeartbeatRequest(client_id="c1"), timeout=10)
            before = status(api).trainer

            def trains_on_through_a_failed_save() -> bool:
                state = status(api).trainer
                assert state.error == "", f"the trainer stopped: {state.error}"
                return state.save_failures >= 1 and state.step > before.step

            wait_for(trains_on_through_a_failed_save, "training on, and a failed checkpoint save", timeout=120)
            during = status(api).trainer
            assert during.step > before.step and during.error == "" and "disk" in during.save_error
            assert during.phase == collafuse_pb2.PHASE_TRAINING
            assert not list((store / "checkpoints").glob("tmp-*")), "a failed save leaves no temporary folder"
            # Space is back: the next save works, and uploads are stored again.
            filler.unlink()
            wait_for(lambda: status(api).trainer.save_failures == 0, "a checkpoint once space is back", timeout=60)
            assert status(api).trainer.saved_step > during.saved_step
            assert upload(api, chunks("c1", 20, 4, 2, prefix="late")).stored == 4
            # SIGTERM saves the last step.
            last = status(api).trainer.step
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        saved = checkpoint.saved_step(checkpoint.latest(store / "checkpoints"))
        assert saved is not None and saved >= last
        assert not list((store / "checkpoints").glob("tmp-*"))


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelled_or_expired_streams_store_nothing_on_a_real_server(tmp_path: Path, how: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with server_process(store, "--max-steps", "1"):
        api = api_at(address(store))
        register(api, "c1", cut=20)
        for run in range(10):
            gate = threading.Event()
            sent = chunks("c1", 20, 3, 1, prefix=f"run{run}")

            def stream(sent: list[collafuse_pb2.ReleaseChunk] = sent, gate: threading.Event = gate
                       ) -> Iterator[collafuse_pb2.ReleaseChunk]:
                yield from sent
                gate.wait(30)

            if how == "cancel":
                future = api.Release.future(stream(), timeout=30)
                time.sleep(0.2)
                future.cancel()
            else:
                with pytest.raises(grpc.RpcError):
                    api.Release(stream(), timeout=0.4)
            gate.set()
        time.sleep(1.0)
        assert status(api).clients[0].releases == 0
    assert store_rows(store) == {}
