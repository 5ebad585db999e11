"""The whole client lifecycle against a small in-process fake server (the real server has its own e2e tests)."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest
import torch
from client_fake_server import FakeServer, FakeState, make_image_folder
from sampling_reference import reference_sample, relative_difference

from collafuse.client.errors import ClientError, LedgerRefusal, ServerFingerprintChanged
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.local_data import map_labels
from collafuse.client.trainer import model_dir
from collafuse.common.config import ClientSettings
from collafuse.common.data import UNLABELED, DataError
from collafuse.common.models import load_model
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_lifecycle(settings: ClientSettings, **kwargs: Any) -> dict[str, Any]:
    with ClientLifecycle(settings, **kwargs) as client:
        return client.run()


def _settings(tmp_path, target, **overrides) -> ClientSettings:  # type: ignore[no-untyped-def]
    values = {
        "data": tmp_path / "data", "server": target, "workdir": tmp_path / "work", "cut": 20, "train_steps": 3,
        "batch_size": 4, "inference_steps": 10, "samples_per_class": 2, "retries": 2, "rpc_timeout": 10, "seed": 5,
        "device": "cpu",
    }
    values.update(overrides)
    return ClientSettings(**values)


def test_full_lifecycle_writes_outputs_and_matches_the_reference_sampler(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0", "2"), per_class=4)
    with FakeServer() as fake:
        settings = _settings(tmp_path, fake.target)
        metrics = run_lifecycle(settings, poll_interval=0.01)
        work = settings.workdir
        for name in ("ledger.sqlite", "metrics.json", "loss.png", "server.json", "checkpoints/latest/ema/config.json",
                     "checkpoints/latest/ema/collafuse.json", "checkpoints/latest/trainer.pt", "samples/grid.png",
                     "samples/handoff.npy", "samples/samples.npy", "samples/labels.npy",
                     "samples/0000_0.png", "samples/0003_2.png"):
            assert (work / name).is_file(), name
        stored = json.loads((work / "metrics.json").read_text())
        assert stored["client_id"] == metrics["client_id"] and stored["cut"] == 20 and stored["num_images"] == 8
        assert len(stored["local_losses"]) == 3 and stored["local_train_steps"] == 3
        # By default the server guides its half (scale 2: two evaluations per step), the client's half is plain.
        assert stored["model_evaluations_per_image"] == {"server": 12, "client": 4}
        assert set(stored["wall_seconds"]) >= {"register", "load_data", "contribute", "train", "wait_for_server", "generate", "total"}
        assert {"Register", "Release", "Heartbeat", "Sample"} <= set(stored["rpc"])
        assert stored["bytes_sent"] > 0 and stored["bytes_received"] > 0
        assert stored["contribution"]["sent"] == 8 and len(fake.servicer.store) == 8

        # Same seed, same weights: the gRPC split equals one plain loop over the chain (tests/sampling_reference.py).
        labels = np.load(work / "samples/labels.npy")
        assert labels.tolist() == [0, 0, 2, 2]
        [request] = fake.servicer.sample_requests
        assert list(request.labels) == [0, 0, 2, 2] and request.seed == 5 and request.cut == 20
        assert request.guidance_scale == 2.0
        client_model, meta = load_model(model_dir(work))
        assert meta["step"] == 3 and meta["cut"] == 20
        x_cut, x0 = reference_sample(
            fake.servicer.model, client_model, num_train_timesteps=fake.servicer.state.schedule.num_train_timesteps,
            kind="ddpm", num_inference_steps=10, cut=20, labels=labels.tolist(), seed=5, guidance=2.0,
            client_guidance=1.0, image_shape=(1, 8, 8),
        )
        got_cut, got_x0 = np.load(work / "samples/handoff.npy"), np.load(work / "samples/samples.npy")
        assert relative_difference(torch.from_numpy(got_cut), x_cut) <= 1e-5
        assert relative_difference(torch.from_numpy(got_x0), x0) <= 1e-5

        # A second run re-releases nothing, and training resumes up to a new target.
        again = run_lifecycle(settings.model_copy(update={"train_steps": 5}), poll_interval=0.01)
        assert again["contribution"]["sent"] == 0 and again["contribution"]["already_released"] == 8
        assert again["local_train_steps"] == 5 and again["local_train_steps_this_run"] == 2
        assert len(again["local_losses"]) == 5
        assert fake.servicer.release_calls == 1


@pytest.mark.parametrize(("server_scale", "client_scale"), [(2.0, 1.0), (1.0, 3.0), (None, 2.5)])
def test_each_half_is_guided_at_its_own_scale(tmp_path, server_scale, client_scale):
    """--server-guidance-scale sets the scale the client asks the server for; --guidance-scale guides the client's
    own half (and the server's, where no server scale is set). Checked against the independent loop."""
    make_image_folder(tmp_path / "data", classes=("0", "2"), per_class=2)
    with FakeServer() as fake:
        settings = _settings(tmp_path, fake.target, guidance_scale=client_scale, server_guidance_scale=server_scale,
                             samples_per_class=1)
        metrics = run_lifecycle(settings, poll_interval=0.01)
        expected_server = client_scale if server_scale is None else server_scale
        [request] = fake.servicer.sample_requests
        assert request.guidance_scale == expected_server
        # Two model evaluations per step only in a guided half (6 server steps and 4 client steps per image).
        assert metrics["model_evaluations_per_image"] == {
            "server": 6 * (1 if expected_server == 1.0 else 2), "client": 4 * (1 if client_scale == 1.0 else 2)}
        client_model, _ = load_model(model_dir(settings.workdir))
        x_cut, x0 = reference_sample(
            fake.servicer.model, client_model, num_train_timesteps=fake.servicer.state.schedule.num_train_timesteps,
            kind="ddpm", num_inference_steps=10, cut=20, labels=[0, 2], seed=5, guidance=expected_server,
            client_guidance=client_scale, image_shape=(1, 8, 8),
        )
        work = settings.workdir
        assert relative_difference(torch.from_numpy(np.load(work / "samples/handoff.npy")), x_cut) <= 1e-5
        assert relative_difference(torch.from_numpy(np.load(work / "samples/samples.npy")), x0) <= 1e-5


def test_global_model_and_independent_client_paths(tmp_path, caplog):
    make_image_folder(tmp_path / "data", classes=("1",), per_class=3)
    with FakeServer() as fake:
        with caplog.at_level(logging.INFO):
            gm = run_lifecycle(_settings(tmp_path, fake.target, cut=0, workdir=tmp_path / "gm"), poll_interval=0.01)
        assert "RAW IMAGES" in caplog.text and "no local model" in caplog.text
        assert gm["model_evaluations_per_image"] == {"server": 20, "client": 0}  # the server's guided half
        assert not (tmp_path / "gm/model").exists()
        np.testing.assert_array_equal(np.load(tmp_path / "gm/samples/samples.npy"), np.load(tmp_path / "gm/samples/handoff.npy"))

        released = len(fake.servicer.store)
        icm = run_lifecycle(_settings(tmp_path, fake.target, cut=50, workdir=tmp_path / "icm"), poll_interval=0.01)
        assert len(fake.servicer.store) == released  # nothing left the ICM client
        assert icm["model_evaluations_per_image"] == {"server": 0, "client": 10}
        assert "Heartbeat" not in icm["rpc"]  # no need to wait for the server's training


def test_refusals_and_mismatches_are_clear_and_keep_the_ledger(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    with FakeServer() as fake:
        settings = _settings(tmp_path, fake.target)
        with ClientLifecycle(settings) as client:
            client.contribute()
        with ClientLifecycle(settings.model_copy(update={"cut": 30})) as client:
            with pytest.raises(LedgerRefusal, match="already released at cut 20"):
                client.contribute()
            assert client.ledger.summary()["releases"] == 2
        with ClientLifecycle(settings) as client:
            client.forget()
            with pytest.raises(LedgerRefusal, match="forget"):
                client.contribute()
            client.ledger.set_fingerprint("0" * 64, fake.target)
            with pytest.raises(ServerFingerprintChanged, match="reset --yes") as changed:
                client.register()
            assert "workdir" not in str(changed.value)  # a fresh ledger would release every image again
            client.reset()
            client.register()
            # Releases outlive forget and reset: sending them again takes its own confirmation, and is counted.
            with pytest.raises(LedgerRefusal, match="forget.*--re-release-confirm"):
                client.contribute()
        with ClientLifecycle(settings.model_copy(update={"re_release_confirm": True})) as client:
            assert client.contribute().re_released == 2
            assert client.ledger.summary()["re_releases"] == 2


def test_wait_for_server_times_out_with_advice(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    with FakeServer(FakeState(phases=["training"])) as fake:
        settings = _settings(tmp_path, fake.target, wait_timeout=0.05)
        with (
            ClientLifecycle(settings, poll_interval=0.01) as client,
            pytest.raises(ClientError, match="did not finish within.*--no-wait-for-server"),
        ):
            client.wait_for_server()
    with FakeServer(FakeState(phases=["waiting", "training", "done"])) as fake:
        settings = _settings(tmp_path, fake.target, workdir=tmp_path / "w2")
        with ClientLifecycle(settings, poll_interval=0.01) as client:
            assert client.wait_for_server().phase == collafuse_pb2.PHASE_DONE
            assert client.connection.traffic["Heartbeat"].calls == 3


def test_generate_without_a_local_model_says_what_to_do(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    with FakeServer() as fake, ClientLifecycle(_settings(tmp_path, fake.target)) as client:
        with pytest.raises(ClientError, match="no local model.*collafuse-client train"):
            client.generate()
        assert fake.servicer.sample_requests == []  # checked before the server spends a chain


def test_an_error_during_training_keeps_a_complete_resumable_model(tmp_path, monkeypatch):
    from collafuse.client import trainer

    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    with FakeServer() as fake:
        settings = _settings(tmp_path, fake.target, train_steps=2)
        with ClientLifecycle(settings) as client:
            client.train()
        calls = []
        real_loss = trainer.client_loss

        def failing_loss(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated crash in the middle of training")
            return real_loss(*args, **kwargs)

        monkeypatch.setattr(trainer, "client_loss", failing_loss)
        with (
            ClientLifecycle(settings.model_copy(update={"train_steps": 6})) as client,
            pytest.raises(RuntimeError, match="simulated crash"),
        ):
            client.train()
        _, meta = load_model(model_dir(settings.workdir))
        assert meta["step"] == 3  # the step finished before the crash was kept
        assert sorted(p.name for p in (settings.workdir / "checkpoints").iterdir()) == ["latest"], "no tmp-* or previous"
        monkeypatch.setattr(trainer, "client_loss", real_loss)
        with ClientLifecycle(settings.model_copy(update={"train_steps": 6})) as client:
            result = client.train()
        assert (result.start_step, result.step, len(result.losses)) == (3, 6, 6)


def test_labels_follow_the_servers_class_order_and_unknown_classes_are_named(tmp_path):
    assert map_labels(["dog", "cat", UNLABELED], ["cat", "dog"], tmp_path).tolist() == [1, 0, 2]  # 2: the null label
    with pytest.raises(DataError, match=r"classes \['bird'\] .* are not served"):
        map_labels(["cat", "bird"], ["cat", "dog"], tmp_path)
