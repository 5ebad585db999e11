"""The server half of collaborative sampling (DESIGN 1c) with a consistent EMA snapshot.

Every image's noise derives from (seed, image index, timestep), and the images
keep their request indices however they are split into batches, so the result
equals ``common.sampling.server_half`` on the whole request bit for bit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.models import UNet2DModel

from collafuse.common.models import as_denoiser
from collafuse.common.sampling import ProgressFn, count_model_evaluations, server_half
from collafuse.common.schedule import ScheduleConfig, SchedulerKind

log = logging.getLogger(__name__)

# (model step, frozen EMA model) -- Trainer.ema_snapshot.
ModelSource = Callable[[], tuple[int, UNet2DModel]]


class SampleCancelled(Exception):
    """The caller went away or the server is shutting down."""


@dataclass(frozen=True)
class SampleJob:
    labels: Sequence[int]
    seed: int
    num_inference_steps: int
    kind: SchedulerKind
    guidance_scale: float
    cut: int


@dataclass(frozen=True)
class SampleResult:
    x_cut: torch.Tensor  # float32 [N, C, H, W] on the CPU
    server_steps: int  # model evaluations per image
    model_step: int  # training step of the EMA weights used


class Sampler:
    """Runs jobs in batches of at most ``batch_size`` images; at most ``max_concurrent`` at once."""

    def __init__(
        self,
        schedule: ScheduleConfig,
        image_shape: tuple[int, int, int],
        models: ModelSource,
        device: torch.device,
        batch_size: int = 256,
        max_concurrent: int = 2,
    ) -> None:
        self.schedule = schedule
        self.image_shape = image_shape
        self.device = device
        self.batch_size = max(1, batch_size)
        self._models = models
        # Bounds memory and CPU when many clients sample at once; further requests queue here.
        self._slots = threading.BoundedSemaphore(max(1, max_concurrent))
        self._count_lock = threading.Lock()
        self.images_sampled = 0
        self.model_evaluations = 0

    def evaluations_per_image(self, job: SampleJob) -> int:
        return count_model_evaluations(self.schedule, job.kind, job.num_inference_steps, job.cut)[0]

    def sample(
        self,
        job: SampleJob,
        progress: ProgressFn | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> SampleResult:
        """x_T -> x_hat_cut for every label of the job; progress reports (steps done, steps total)."""
        n = len(job.labels)
        per_image = self.evaluations_per_image(job)
        batches = [list(range(s, min(n, s + self.batch_size))) for s in range(0, n, self.batch_size)]
        total = per_image * len(batches)
        calls = [0]
        with self._slots:
            model_step, model = self._models()
            base = as_denoiser(model, job.guidance_scale)

            def denoiser(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                return base(x, t, labels)

            outputs = []
            # Cross-request batching slots in here: a batcher would merge the steps of jobs that share
            # (kind, num_inference_steps) into one denoiser call per timestep; the per-image noise
            # (seed, index, t) keeps every job's result unchanged.
            for b, indices in enumerate(batches):
                done_before = b * per_image

                def step_done(done: int, _total: int, offset: int = done_before) -> None:
                    if cancelled is not None and cancelled():
                        raise SampleCancelled("sampling cancelled")
                    if progress is not None:
                        progress(offset + done, total)

                labels = torch.tensor([job.labels[i] for i in indices], dtype=torch.long, device=self.device)
                x = server_half(
                    denoiser, self.schedule, labels, job.seed, job.cut, job.num_inference_steps, job.kind,
                    self.image_shape, image_indices=indices, progress=step_done,
                )
                outputs.append(x.detach().to("cpu", torch.float32))
        x_cut = torch.cat(outputs) if outputs else torch.empty((0, *self.image_shape))
        server_steps = calls[0] // max(1, len(batches))
        with self._count_lock:
            self.images_sampled += n
            self.model_evaluations += server_steps * n
        log.info(
            "sampled %d images to cut %d with the EMA of step %d: %d server evaluations each (%s, %d steps)",
            n, job.cut, model_step, server_steps, job.kind, job.num_inference_steps,
        )
        return SampleResult(x_cut=x_cut, server_steps=server_steps, model_step=model_step)
