"""The walking system end to end: one server and client processes over loopback gRPC.

One small collaborative run (2 clients, class groups, cut 200) is shared by most tests;
the global-model (cut 0) and independent-client (cut T) baselines run through the same code.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2  # noqa: F401  (registers the health messages the transcript holds)
from sampling_reference import reference_sample, relative_difference

from collafuse.client.ledger import Ledger
from collafuse.client.trainer import model_dir
from collafuse.common.codec import decode
from collafuse.common.data import load_image_folder, save_png
from collafuse.common.diffusion import release, release_noise
from collafuse.common.models import load_model
from collafuse.common.schedule import ScheduleConfig
from collafuse.deploy.healthcheck import check as health_check
from collafuse.deploy.sim import SimSettings, free_port, run, server_command
from collafuse.evaluation.audit.transcript import tensors_of
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.v1 import collafuse_pb2, tensor_pb2  # noqa: F401  (registers the CollaFuse messages)

CLASSES = ["0", "1", "2", "3"]
SIZE = 8  # the digits' own resolution, the simulation's default
SCHEDULE = ScheduleConfig()


def _digits_folder(root: Path, per_class: int = 12) -> Path:
    images, labels = digits_arrays(SIZE)
    for c in CLASSES:
        for i in np.flatnonzero(labels == int(c))[:per_class]:
            save_png(images[i], root / c / f"{i:04d}.png")
    return root


def _sim(out: Path, data: Path, clients: int, cut: int, **extra: Any) -> SimSettings:
    settings = SimSettings(
        clients=clients, cut=cut, steps=12, client_steps=8, dataset=str(data), partition="classes",
        out=out, seed=3, batch_size=16, image_size=SIZE, samples_per_class=2, inference_steps=10, threads=1,
        timeout=600, **extra,
    )
    run(settings)
    return settings


@pytest.fixture(scope="module")
def collaborative(tmp_path_factory: pytest.TempPathFactory) -> SimSettings:
    root = tmp_path_factory.mktemp("e2e")
    return _sim(root / "run", _digits_folder(root / "digits"), clients=2, cut=200, transcript=True)


def _transcript(settings: SimSettings) -> list[dict[str, Any]]:
    lines = (settings.out / "server" / "transcript.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _client_dir(settings: SimSettings, k: int) -> Path:
    return settings.out / "clients" / f"client-{k}"


def _shard(settings: SimSettings, k: int) -> Path:
    return settings.out / "data" / "shards" / f"client-{k}"


def test_sim_outputs(collaborative: SimSettings) -> None:
    out = collaborative.out
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["clients"]) == {"client-0", "client-1"}
    for name, metrics in summary["clients"].items():
        assert metrics["local_train_steps"] == 8 and metrics["bytes_sent"] > 0 and metrics["bytes_received"] > 0
        assert (out / "grids" / f"{name}.png").is_file()
    assert summary["pooled"]["images"] == 48 and summary["pooled"]["bytes_sent"] > 48 * SIZE * SIZE * 4
    assert (out / "loss_curves.png").is_file()


def test_server_trained_on_every_clients_releases(collaborative: SimSettings) -> None:
    metrics = json.loads((collaborative.out / "server" / "metrics.json").read_text())
    assert metrics["step"] == 12
    assert metrics["releases"] == 48 and metrics["clients_with_releases"] == 2


def test_server_receives_only_x_cut(collaborative: SimSettings) -> None:
    """Every image tensor the server received is a client's x_cut, recomputed here from x0 and the ledger seed."""
    ab = SCHEDULE.alphas_cumprod()
    private: dict[str, tuple[torch.Tensor, int]] = {}  # image key -> (x0, seed)
    secrets: list[bytes] = []
    for k in range(2):
        data = load_image_folder(_shard(collaborative, k), 1, SIZE)
        with Ledger(_client_dir(collaborative, k)) as ledger:
            keys = ledger.image_keys(data.images)
            for key, x0, path in zip(keys, data.images, data.paths):
                records = ledger.releases(key)
                assert len(records) == 1, f"{path} released {len(records)} times"
                assert path not in key
                private[key] = (x0, records[0].seed)
                secrets += [x0.numpy().astype("<f4").tobytes(), release_noise([records[0].seed], (1, SIZE, SIZE)).numpy().astype("<f4").tobytes()]

    received: dict[str, int] = {}
    methods = set()
    for entry in _transcript(collaborative):
        method = entry["method"].rsplit("/", 1)[1]
        methods.add(method)
        payload = base64.b64decode(entry["payload_b64"])
        assert not any(secret in payload for secret in secrets), f"{method} carried raw x0 or eps bytes"
        request = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(entry["request_type"]))()
        request.ParseFromString(payload)
        tensors = list(tensors_of(request))
        if method != "Release":
            assert not tensors, f"{method} carried tensors {[n for n, _ in tensors]}"
            continue
        assert {name for name, _ in tensors} <= {"items.x_cut"} and request.cut == 200
        for item in request.items:
            x0, seed = private[item.image_key]
            expected = release(x0[None], [seed], 200, ab)[0]
            got = decode(item.x_cut, shape=[1, SIZE, SIZE])
            assert torch.allclose(got, expected, atol=1e-6)
            assert not torch.allclose(got, x0, atol=0.05)
            received[item.image_key] = received.get(item.image_key, 0) + 1
    assert {"Register", "Release", "Sample", "Heartbeat"} <= methods
    assert received == {key: 1 for key in private}, "every image reaches the server exactly once"


def test_sampling_over_grpc_matches_the_reference_loop(collaborative: SimSettings) -> None:
    """Each client's hand-off and samples equal one plain loop over the chain with the same weights and seed, at the
    sim's default guidance: the server's half guided at 2, the client's plain."""
    assert (collaborative.server_guidance_scale, collaborative.guidance_scale) == (2.0, 1.0)
    server_model, _ = load_model(collaborative.out / "server" / "checkpoints" / "latest" / "ema")
    for k in range(2):
        samples = _client_dir(collaborative, k) / "samples"
        client_model, _ = load_model(model_dir(_client_dir(collaborative, k)))
        labels = np.load(samples / "labels.npy").tolist()
        x_cut, x0 = reference_sample(
            server_model, client_model, num_train_timesteps=1000, kind="ddpm", num_inference_steps=10, cut=200,
            labels=labels, seed=collaborative.seed + k, guidance=2.0, client_guidance=1.0, image_shape=(1, SIZE, SIZE),
        )
        for name, expected in (("handoff.npy", x_cut), ("samples.npy", x0)):
            got = torch.from_numpy(np.load(samples / name))
            rel = relative_difference(got, expected)
            assert rel <= 1e-5, f"client-{k} {name}: relative difference {rel:.2e}"


def _run_client(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collafuse.client", *argv], capture_output=True, text=True, timeout=300, check=False)


def test_restart_and_retried_release_store_each_image_once(collaborative: SimSettings) -> None:
    """A restarted server keeps its store; releasing again (a retry, a re-run) adds nothing."""
    port = free_port()
    classes = CLASSES
    server = subprocess.Popen(server_command(collaborative, port, classes).argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not health_check(f"127.0.0.1:{port}", timeout=2):
            assert server.poll() is None and time.monotonic() < deadline, "restarted server did not come up"
            time.sleep(0.5)
        common = ["--server", f"127.0.0.1:{port}", "--workdir", str(_client_dir(collaborative, 0)), "--data", str(_shard(collaborative, 0)), "--cut", "200"]
        for _ in range(2):
            result = _run_client("release", *common)
            assert result.returncode == 0, result.stderr
        status = json.loads(_run_client("status", *common).stdout)
        held = {c["client_id"]: int(c["releases"]) for c in status["server"]["clients"]}
        assert held == {"client-0": 24, "client-1": 24}
        # Another cut for the same images is refused: two releases of one image would leak more.
        other = _run_client("release", *common[:-1], "500")
        assert other.returncode == 2 and "cut" in other.stderr
    finally:
        server.terminate()
        server.wait(60)
    with Ledger(_client_dir(collaborative, 0)) as ledger:
        assert set(ledger.release_counts().values()) == {1}


# Each baseline also runs under the other launcher (the default, forkserver, runs everything else).
@pytest.mark.parametrize("cut,launcher", [(0, "subprocess"), (1000, "forkserver")])
def test_baselines_run_through_the_same_code(tmp_path: Path, cut: int, launcher: str) -> None:
    settings = _sim(tmp_path / "run", _digits_folder(tmp_path / "digits", per_class=4), clients=1, cut=cut,
                    launcher=launcher)
    metrics = json.loads((settings.out / "metrics.json").read_text())["clients"]["client-0"]
    samples = settings.out / "clients" / "client-0" / "samples"
    handoff, final = np.load(samples / "handoff.npy"), np.load(samples / "samples.npy")
    assert np.isfinite(final).all() and final.shape == (8, 1, SIZE, SIZE)
    server = json.loads((settings.out / "server" / "metrics.json").read_text()) if (settings.out / "server" / "metrics.json").is_file() else {}
    if cut == 0:  # GM: the server does every step (guided by default: two evaluations each), the client none
        assert metrics["model_evaluations_per_image"] == {"server": 20, "client": 0}
        assert np.array_equal(handoff, final)
        assert server["releases"] == 16
    else:  # ICM: nothing released, the client does every step
        assert metrics["model_evaluations_per_image"] == {"server": 0, "client": 10}
        assert metrics["contribution"]["sent"] == 0
        assert server.get("releases", 0) == 0
