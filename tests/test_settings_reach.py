"""Every server and client setting reaches the object that uses it.

Option groups (the training core's ``TrainOptions``, the split rounds' ``RoundLimits``, the sampler's
``SamplingLimits``, the client's ``SplitOptions``) are built from the settings; a field copied by the wrong
name, or not at all, silently runs with its default. Each check sets every field of a group to a value that
is not its default and looks at the object the running code uses. The tables at the bottom say where each
remaining field goes, so a new setting fails this test until it is placed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from server_support import start

from collafuse.client.connection import ServerConnection
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.protocols import client_protocol
from collafuse.client.protocols.split import SplitClient
from collafuse.common.config import ClientSettings, ServerSettings, TrainOptions
from collafuse.server.protocols.split import SplitProtocol
from collafuse.v1 import collafuse_pb2

# A non-default value for every field of the training core (the server's, the client's and the sim's).
CORE: dict[str, Any] = {"lr": 1.5e-3, "weight_decay": 0.05, "ema_decay": 0.9, "warmup_steps": 7, "grad_clip": 0.5,
        "mixed_precision": "off", "max_nonfinite_steps": 4, "seed": 11}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_core_options_are_every_training_field() -> None:
    assert set(CORE) == set(TrainOptions.model_fields), "give every TrainOptions field a value here"
    for settings_type in (ServerSettings, ClientSettings):
        assert set(TrainOptions.model_fields) <= set(settings_type.model_fields), settings_type.__name__


def test_every_server_setting_reaches_the_running_server(tmp_path: Path) -> None:
    split = {"split_max_round_clients": 5, "split_round_timeout": 12.0, "split_max_grad_norm": 77.0,
             "split_max_batch": 40, "split_cross_client": True, "split_max_wait_ms": 9.0, "split_trust_window": 5,
             "split_trust_rows": 6}
    sampling = {"sample_workers": 2, "sample_queue_per_client": 3, "sample_queue_total": 9, "sample_max_batch": 50,
                "sample_max_wait_ms": 7.0, "sample_cross_client": False}
    server = start(tmp_path / "store", start_trainer=False, label_dropout=0.25, max_steps=123, **CORE, **split,
                   **sampling)
    try:
        core = server.trainer.core
        assert core.options == TrainOptions(**CORE)
        group = core.optimizer.param_groups[0]
        assert (group["initial_lr"], group["weight_decay"]) == (CORE["lr"], CORE["weight_decay"])  # lr: warming up
        assert core.ema.decay == CORE["ema_decay"] and core.amp_dtype is None
        assert server.trainer.max_steps == 123 and server.trainer.source.batch_size == 8  # type: ignore[attr-defined]
        protocol = server.servicer.protocols[collafuse_pb2.PROTOCOL_SPLIT]
        assert isinstance(protocol, SplitProtocol)
        engine = protocol.engine
        assert engine.core is core and engine.max_steps == 123 and engine.label_dropout == 0.25
        limits = engine.limits
        assert (limits.max_clients, limits.timeout, limits.max_grad_norm, limits.max_batch) == (5, 12.0, 77.0, 40)
        assert engine.merger is not None and engine.merger.max_wait_s == pytest.approx(0.009)
        assert engine.merger.max_batch == 40
        assert engine.trust is not None and (engine.trust.window, engine.trust_rows) == (5, 6)
        s = server.sampler.limits
        assert (s.workers, s.per_client, s.total, s.max_batch, s.max_wait_s, s.cross_client) == (
            2, 3, 9, 50, pytest.approx(0.007), False)
        used = set(CORE) | set(split) | set(sampling) | {"label_dropout", "max_steps", "batch_size"}
        unplaced = set(ServerSettings.model_fields) - used - set(SERVER_ELSEWHERE)
        assert not unplaced, f"server settings with no check and no entry in SERVER_ELSEWHERE: {sorted(unplaced)}"
    finally:
        server.stop(0)


def test_every_client_setting_reaches_what_uses_it(tmp_path: Path) -> None:
    split: dict[str, Any] = {"split_batch_size": 6, "split_steps": 9, "dp_clip": 0.3, "dp_noise_multiplier": 0.7,
                             "dp_epsilon": 5.0, "dp_delta": 1e-6, "split_max_image_exposure": 2.5,
                             "split_max_sends_per_image": 7}
    connection: dict[str, Any] = {"rpc_timeout": 17.0, "retries": 3, "wait_timeout": 99.0}
    settings = ClientSettings(workdir=tmp_path / "w", batch_size=20, protocol="split", device="cpu", **CORE, **split,
                              **connection)
    assert TrainOptions.from_settings(settings) == TrainOptions(**CORE)
    chosen = client_protocol("split", settings)
    assert isinstance(chosen, SplitClient)
    o = chosen.options
    assert (o.batch_size, o.steps, o.dp_clip, o.dp_noise_multiplier, o.dp_epsilon, o.dp_delta) == (6, 9, 0.3, 0.7, 5.0, 1e-6)
    assert (o.max_image_exposure, o.max_sends_per_image) == (2.5, 7)
    with ClientLifecycle(settings) as client:
        conn: ServerConnection = client.connection
        assert conn.rpc_timeout == 17.0 and conn.policy.attempts == 3 and conn.policy.wait_timeout == 99.0
        assert client.device == torch.device("cpu")
    used = set(CORE) | set(split) | set(connection) | {"batch_size", "protocol", "device", "workdir"}
    unplaced = set(ClientSettings.model_fields) - used - set(CLIENT_ELSEWHERE)
    assert not unplaced, f"client settings with no check and no entry in CLIENT_ELSEWHERE: {sorted(unplaced)}"


# Settings read where they are used (the settings object itself is passed there), each with a test of its own.
SERVER_ELSEWHERE: dict[str, str] = {
    "host": "app._bind (tests/test_server_app.py)", "port": "app._bind", "metrics_port": "ServerMetrics.serve",
    "store": "ReleaseStore", "dataset": "ServerSettings.for_dataset", "image_size": "image_shape",
    "channels": "image_shape", "classes": "servicer, fingerprint", "model_preset": "Trainer (build_unet)",
    "checkpoint_every": "Trainer", "min_clients": "Trainer._ready", "start_timeout": "Trainer._ready",
    "max_sample_images": "sampling_rpc.sample_job", "share_model": "SharedModel (tests/test_init_from_server.py)",
    "transcript": "TranscriptInterceptor", "tokens": "Authenticator",
    "operators": "Authenticator", "token": "Authenticator", "tls_cert": "server_credentials",
    "tls_key": "server_credentials", "tls_ca": "server_credentials, Authenticator", "threads": "setup_torch",
    "device": "resolve_device", "log_level": "setup_logging", "ambient_weighting": "ambient_source",
    "ambient_max_weight": "ambient_source", "ambient_timesteps": "ambient_source (tests/test_ambient_timesteps.py)",
    "ambient_loss": "ambient_source (tests/test_ambient_loss_x0.py)",
    "train_from_store": "ambient_source (tests/test_ambient_store.py)",
    "train_cache_rows": "ambient_source (tests/test_ambient_store.py)", "num_train_timesteps": "schedule()", "beta_start": "schedule()",
    "beta_end": "schedule()", "beta_schedule": "schedule()",
    # Reliability settings, each checked in tests/test_reliability_settings.py:
    **dict.fromkeys(("guard_refuse_norm", "guard_spike_factor", "guard_warmup_steps", "guard_undo"),
                    "Trainer (update_guard)"),
    "keep_checkpoints": "Trainer.save_checkpoint", "split_max_strikes": "servicer.strikes",
    "split_strike_cooldown": "servicer.strikes", "split_clip_grad_norm": "SplitProtocol.split_backward",
    "split_relative_grad_clip": "SplitProtocol.row_norms", "release_max_stream_bytes": "servicer.Release",
    "release_max_stream_chunks": "servicer.Release", "max_clients": "servicer.Register",
    "autoencoder": "server/latent.served_setup (tests/test_latent_settings.py)",
}
CLIENT_ELSEWHERE: dict[str, str] = {
    "data": "ClientLifecycle.scan/load_data", "server": "ClientLifecycle.connection",
    "client_id": "Ledger.client_id", "cut": "every step of the lifecycle", "image_size": "joining.register",
    "model_preset": "train_local", "train_steps": "train_local", "samples_per_class": "generate_samples",
    "inference_steps": "generate_samples", "scheduler": "generate_samples", "guidance_scale": "generate_samples",
    "server_guidance_scale": "generate_samples (tests/test_client_lifecycle.py)",
    "wait_for_server": "ClientLifecycle.wait_for_server", "max_release_alpha_bar": "noise_floor.check_schedule",
    "re_release_confirm": "ClientLifecycle.contribute", "label_dropout": "train_local",
    "threads": "setup_torch", "log_level": "setup_logging", "token": "ClientLifecycle.connection",
    "tls_cert": "tls_credentials", "tls_key": "tls_credentials", "tls_ca": "tls_credentials",
    "autoencoder": "joining.own_autoencoder (tests/test_latent_settings.py)",
    "handoff_margin": "ClientLifecycle.train/generate (tests/test_handoff_margin.py)",
    "local_timesteps": "train_local (tests/test_local_timesteps.py)",
    "init_from_server": "ClientLifecycle.train (tests/test_init_from_server.py)",
    **{f"reference_{name}": "noise_floor.floor_config (tests/test_noise_floor.py)"
       for name in ("timesteps", "beta_start", "beta_end", "beta_schedule")},
}
