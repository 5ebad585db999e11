"""``--guidance-scale`` (classifier-free guidance; issue 19's accuracy half): what a user gets from the collaborative
chain. The server guides its half (T ... cut) from the scale in each client's SampleRequest, the client guides its
own half; both models learned the null label by the training's label drop-out. The sampling arithmetic is checked
against an independent loop elsewhere (tests/test_server_sample.py); this test checks the outcome: samples that
match their labels more often."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from server_support import start

from collafuse.client.generate import load_client_model
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.common.config import ClientSettings
from collafuse.common.data import save_png
from collafuse.common.models import as_denoiser
from collafuse.common.sampling import client_half, make_chain
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.classifier import PixelClassifier


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow  # about a minute on 2 cores; `make test-faults` (CI) runs it, benchmarks/cut_study.py measures FID
def test_guided_collaborative_samples_match_their_labels_more_often(tmp_path: Path) -> None:
    """Real digits (8x8, ten classes) at cut 200 of T = 1000: the client releases them, the server trains 300 steps
    on the releases, the client 200 on t <= 200. Then the client generates ten images per class twice through the
    server, plainly and with guidance 2. Measured on 2 cores: accuracy 0.65-0.66 plain, 0.92-0.95 guided, and 0.84
    with only the server's half guided (its guided hand-off finished by the client's model without guidance)."""
    torch.set_num_threads(1)
    images, targets = digits_arrays(8)
    classes = [str(c) for c in range(10)]
    for i, (image, label) in enumerate(zip(images, targets)):
        save_png(image, tmp_path / "data" / str(int(label)) / f"{i:04d}.png")
    classifier = PixelClassifier().fit(images, [str(int(v)) for v in targets])
    server = start(tmp_path / "store", classes=classes, num_train_timesteps=1000, max_steps=300, batch_size=32,
                   lr=2e-3, max_sample_images=128)
    plain = ClientSettings(data=tmp_path / "data", server=server.address, workdir=tmp_path / "work", cut=200,
                           train_steps=200, batch_size=32, lr=2e-3, retries=2, rpc_timeout=60, device="cpu", seed=0,
                           samples_per_class=10, inference_steps=50)

    def accuracy(samples: torch.Tensor, labels: list[int]) -> float:
        return float((classifier.predict(samples.numpy()) == np.array([str(y) for y in labels])).mean())

    generated = {}
    try:
        with ClientLifecycle(plain, show_progress=False, poll_interval=0.05) as client:
            client.contribute()
            client.train()
            client.wait_for_server()
            info = client.server_info()
        for scale in (1.0, 2.0):
            with ClientLifecycle(plain.model_copy(update={"guidance_scale": scale}), show_progress=False,
                                 poll_interval=0.05) as client:
                result = client.generate()
            assert result is not None and len(result.labels) == 100
            generated[scale] = result
    finally:
        server.stop(0)
    scores: dict[float | str, float] = {scale: accuracy(r.x0, r.labels) for scale, r in generated.items()}
    # The server's half alone: its guided hand-off finished by the client's model without guidance.
    guided = generated[2.0]
    model = load_client_model(tmp_path / "work", info.fingerprint, 200)
    plain_finish = client_half(as_denoiser(model), make_chain(info.schedule, "ddpm", 50, 200), guided.x_cut,
                               torch.tensor(guided.labels), 0, 200)
    scores["server_guided_only"] = accuracy(plain_finish, guided.labels)
    # The client guided its own half too: the same hand-off and seeds, and its images differ from the plain finish.
    assert (guided.x0 - plain_finish).abs().max() > 1e-3, "the client's half is not guided"
    assert scores[2.0] >= 0.8, f"guided samples should match their labels: {scores}"
    assert scores[2.0] >= scores[1.0] + 0.15, f"guidance does not help: {scores}"
    assert scores["server_guided_only"] >= scores[1.0] + 0.1, f"the server's half is not guided: {scores}"
