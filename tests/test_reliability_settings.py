"""Every setting issue 16 added reaches the object that uses it (each is set to a value that is not its default)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from server_support import chunks, register, rpc_error, start, stub

from collafuse.client.connection import end_of_stream
from collafuse.common import checkpoint
from collafuse.common.config import ServerSettings
from collafuse.common.train_loop import UpdateGuard
from collafuse.server.protocols.split import SplitProtocol
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)

RELIABILITY = {
    "guard_refuse_norm": 5e5, "guard_spike_factor": 7.0, "guard_warmup_steps": 3, "guard_undo": False,
    "keep_checkpoints": 2, "split_max_strikes": 4, "split_strike_cooldown": 12.0, "split_clip_grad_norm": 3.0,
    "split_relative_grad_clip": 6.0, "release_max_stream_bytes": 1 << 20, "release_max_stream_chunks": 77,
    "max_clients": 9,
}


def test_every_reliability_setting_reaches_what_uses_it(tmp_path: Path) -> None:
    for name, value in RELIABILITY.items():
        assert ServerSettings.model_fields[name].default != value, name
    server = start(tmp_path / "store", start_trainer=False, **RELIABILITY)
    try:
        trainer, servicer = server.trainer, server.servicer
        assert trainer.core.guard == UpdateGuard(refuse_norm=5e5, spike_factor=7.0, warmup_steps=3, undo=False)
        assert (servicer.strikes.max_strikes, servicer.strikes.cooldown) == (4, 12.0)
        split = servicer.protocols[collafuse_pb2.PROTOCOL_SPLIT]
        assert isinstance(split, SplitProtocol) and split.row_norms.factor == 6.0
        # Read where they are used (the settings object is passed there), each with a behaviour test:
        # split_clip_grad_norm (test_reliability_guard), release_max_stream_chunks and max_clients
        # (test_reliability_release); the byte bound and keep_checkpoints here.
        assert servicer.settings.split_clip_grad_norm == 3.0 and servicer.settings.max_clients == 9
        api = stub(server)
        register(api, "big", cut=20)
        big = chunks("big", 20, 4500, 4500)  # one ~1.3 MB message: over the 1 MiB per-stream bound
        err = rpc_error(api.Release, end_of_stream(big))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and f"{1 << 20} bytes" in err.details()
        for step in (1, 2, 3):
            trainer.core.step = step
            trainer.save_checkpoint()
        assert [c.step for c in checkpoint.list_checkpoints(trainer.checkpoint_dir)] == [3, 2]
    finally:
        server.stop(0)


@pytest.mark.parametrize("name", sorted(RELIABILITY))
def test_the_flags_are_accepted(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    value = RELIABILITY[name]
    argv = [flag] if value is True else (["--no-" + name.replace("_", "-")] if value is False else [flag, str(value)])
    from collafuse.common.settings import parse_settings

    assert getattr(parse_settings(ServerSettings, argv), name) == value
