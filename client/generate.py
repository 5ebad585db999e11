"""Collaborative sampling, client side (docs/design.md §5): the server runs t > cut, the client finishes.

The request carries the labels, seed, chain length and scheduler; the server streams
back x_hat_cut. The client builds the same chain once (``make_chain``) and runs its
slice with ``common.sampling.client_half``, its EMA model, the same seed and the
same image indices (0..N-1), so the result equals ``common.sampling.handoff_sample``
run in one process with the same weights.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models import UNet2DModel
from tqdm.auto import tqdm

from collafuse.client.connection import ServerConnection, ServerInfo
from collafuse.client.errors import ClientError
from collafuse.client.trainer import model_dir, progress_disabled
from collafuse.common.config import ClientSettings
from collafuse.common.data import save_png
from collafuse.common.files import replace_folder
from collafuse.common.images import save_grid
from collafuse.common.models import as_denoiser, load_model
from collafuse.common.sampling import client_half, make_chain
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
HANDOFF_FILE = "handoff.npy"
SAMPLES_FILE = "samples.npy"
LATENTS_FILE = "latents.npy"  # --autoencoder: the finished latents samples.npy decodes
LABELS_FILE = "labels.npy"
GRID_FILE = "grid.png"


@dataclass
class GenerateResult:
    out_dir: Path
    labels: list[int]
    class_names: list[str]
    server_steps: int
    client_steps: int
    # denoiser evaluations per step of each half: 2 where it is guided (classifier-free guidance)
    server_guidance_factor: int
    client_guidance_factor: int
    server_seconds: float
    client_seconds: float
    x_cut: torch.Tensor
    x0: torch.Tensor

    @property
    def client_evaluations_per_image(self) -> int:
        return self.client_steps * self.client_guidance_factor

    def model_evaluations_per_image(self) -> dict[str, int]:
        return {"server": self.server_steps * self.server_guidance_factor, "client": self.client_evaluations_per_image}

    @property
    def seconds_per_image(self) -> float:
        return (self.server_seconds + self.client_seconds) / max(1, len(self.labels))

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "images": len(self.labels),
            "labels": self.labels,
            "server_steps_per_image": self.server_steps,
            "client_steps_per_image": self.client_steps,
            "client_model_evaluations_per_image": self.client_evaluations_per_image,
            "server_seconds": self.server_seconds,
            "client_seconds": self.client_seconds,
            "seconds_per_image": self.seconds_per_image,
        }


def sample_labels(present: Iterable[int], samples_per_class: int) -> list[int]:
    """``samples_per_class`` images of each class the client holds, grouped by class in label order."""
    return [label for label in sorted({int(p) for p in present}) for _ in range(samples_per_class)]


def guidance_factor(scale: float) -> int:
    """Denoiser evaluations per step at a guidance scale: classifier-free guidance adds the null-label branch."""
    return 1 if scale == 1.0 else 2


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


def load_client_model(workdir: Path, fingerprint: str, cut: int, device: torch.device | str = "cpu") -> UNet2DModel:
    """The EMA model trained for this server setup and cut; a clear error where there is none."""
    folder = model_dir(workdir)
    try:
        model, meta = load_model(folder, device)
    except FileNotFoundError as exc:
        raise ClientError(f"no local model in {folder}: run `collafuse-client train` (or the full `run`) first") from exc
    if meta.get("fingerprint") != fingerprint or int(meta.get("cut", -1)) != cut:
        raise ClientError(
            f"the local model in {folder} was trained for cut {meta.get('cut')} and server fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}…, not cut {cut} / {fingerprint[:12]}…; run `collafuse-client train` again"
        )
    return model


def generate_samples(
    connection: ServerConnection,
    *,
    client_id: str,
    workdir: Path,
    server: ServerInfo,
    labels_present: Iterable[int],
    settings: ClientSettings,
    cut: int,
    device: torch.device | str = "cpu",
    show_progress: bool | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GenerateResult | None:
    """Ask the server for x_hat_cut, finish with the local model, and write ``<workdir>/samples``.

    With ``decode`` (--autoencoder: the chain runs on latents) the hand-off and the finished latents are decoded
    into images for the PNGs, ``samples.npy`` and the grid (the latents go to ``latents.npy`` and ``handoff.npy``);
    the result's ``x_cut``/``x0`` are then the decoded images."""
    # Unlabeled images carry the null label; samples are drawn only for named classes.
    present = sorted({int(y) for y in labels_present if 0 <= int(y) < len(server.class_names)})
    labels = sample_labels(present, settings.samples_per_class)
    if not labels:
        log.info("nothing to generate (samples_per_class %d, labelled classes present %s)", settings.samples_per_class, present)
        return None
    if settings.seed < 0:
        raise ClientError(f"--seed {settings.seed}: sampling seeds must be non-negative")
    kind = settings.scheduler
    chain = make_chain(server.schedule, kind, settings.inference_steps, cut)
    expected_server, client_steps = chain.evaluations(cut)
    # Load before asking the server: a missing model should not cost the server a chain.
    model = load_client_model(workdir, server.fingerprint, cut, device) if client_steps else None

    request = collafuse_pb2.SampleRequest(
        client_id=client_id, labels=labels, seed=settings.seed, num_inference_steps=settings.inference_steps,
        scheduler=kind, guidance_scale=settings.server_half_guidance(), cut=cut,
    )
    log.info("asking the server for %d image(s): %d server step(s), then %d local step(s) each",
             len(labels), expected_server, client_steps)
    with tqdm(desc="server sampling", unit="step", disable=progress_disabled(show_progress), leave=False) as bar:
        def on_progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = connection.sample(request, server.image_shape, on_progress)
    if result.server_steps != expected_server:
        log.warning("server reports %d step(s) per image, expected %d for this chain", result.server_steps, expected_server)

    label_tensor = torch.tensor(labels, dtype=torch.long, device=device)
    started = time.perf_counter()
    if model is None:
        x0 = result.x_cut.clone()
    else:
        with tqdm(total=client_steps, desc="local sampling", unit="step", disable=progress_disabled(show_progress),
                  leave=False) as bar:
            x0 = client_half(
                as_denoiser(model, settings.guidance_scale), chain, result.x_cut.to(device), label_tensor,
                settings.seed, cut, progress=lambda d, t: bar.update(1),
            ).cpu()
    latents: tuple[torch.Tensor, torch.Tensor] | None = None
    x_cut = result.x_cut
    if decode is not None:
        latents = (x_cut, x0)
        x_cut, x0 = decode(x_cut).cpu(), decode(x0).cpu()
    client_seconds = time.perf_counter() - started

    out = _write_outputs(Path(workdir) / SAMPLES_DIR, x_cut, x0, labels, server.class_names, cut, latents)
    generated = GenerateResult(
        out_dir=out, labels=labels, class_names=[server.class_names[y] for y in labels],
        server_steps=result.server_steps, client_steps=client_steps,
        server_guidance_factor=guidance_factor(settings.server_half_guidance()),
        client_guidance_factor=guidance_factor(settings.guidance_scale),
        server_seconds=result.seconds, client_seconds=client_seconds, x_cut=x_cut, x0=x0,
    )
    log.info("wrote %d sample(s) to %s (%.3fs per image: server %.1fs, client %.1fs)",
             len(labels), out, generated.seconds_per_image, result.seconds, client_seconds)
    return generated


def _write_outputs(
    out: Path, x_cut: torch.Tensor, x0: torch.Tensor, labels: list[int], class_names: list[str], cut: int,
    latents: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """PNGs, arrays and the grid, written aside and swapped in so ``samples/`` is always one complete set.
    ``latents``: (hand-off, finished) latents of the decoded ``x_cut``/``x0`` (--autoencoder)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [class_names[y] for y in labels]
    for i, (image, name) in enumerate(zip(x0, names)):
        save_png(image.clamp(-1, 1), tmp / f"{i:04d}_{_file_safe(name)}.png")
    # The hand-off as it came over the wire (latents with --autoencoder); the samples as images.
    np.save(tmp / HANDOFF_FILE, (latents[0] if latents else x_cut).numpy().astype(np.float32))
    np.save(tmp / SAMPLES_FILE, x0.numpy().astype(np.float32))
    if latents is not None:
        np.save(tmp / LATENTS_FILE, latents[1].numpy().astype(np.float32))
    np.save(tmp / LABELS_FILE, np.asarray(labels, dtype=np.int64))
    save_grid(tmp / GRID_FILE, [x_cut, x0], row_titles=[f"server t={cut}", "client t=0"], col_titles=names)
    replace_folder(tmp, out, out.with_name(out.name + ".old"))
    return out
