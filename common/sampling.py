"""The split sampler (DESIGN 1c): small pure functions of a denoiser, the cut is an argument.

The chain runs the scheduler's usual timesteps (``set_timesteps(N)``); each
0-based timestep i belongs to the server when i + 1 > cut and to the client
otherwise. Noise is derived per image from (seed, image index, timestep), so
the result does not depend on how images are batched or which side runs a step:
``split_sample`` equals ``client_half(server_half(...))`` bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler  # not `diffusers`: see common/models.py
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from collafuse.common.diffusion import Denoiser
from collafuse.common.schedule import ScheduleConfig, SchedulerKind, server_evaluates

# Called after each step with (steps_done, steps_total).
ProgressFn = Callable[[int, int], None]
_INITIAL = -1  # the "timestep" tag of x_T's noise


def derive_seed(seed: int, image_index: int, timestep: int) -> int:
    """A 63-bit seed from (request seed, image index, timestep)."""
    digest = hashlib.sha256(f"{seed}:{image_index}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_generators(seed: int, image_indices: Sequence[int], timestep: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, int(j), timestep)) for j in image_indices]


def initial_noise(seed: int, image_indices: Sequence[int], image_shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T ~ N(0, I), one generator per image."""
    gens = image_generators(seed, image_indices, _INITIAL)
    return randn_tensor((len(gens), *image_shape), generator=gens, dtype=torch.float32)


def make_scheduler(schedule: ScheduleConfig, kind: SchedulerKind, num_inference_steps: int) -> DDPMScheduler | DDIMScheduler:
    """The shared scheduler with its strided timesteps set; 0 steps means all T."""
    steps = num_inference_steps or schedule.num_train_timesteps
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_inference_steps {steps} must lie in [1, {schedule.num_train_timesteps}]")
    scheduler = schedule.scheduler(kind)
    scheduler.set_timesteps(steps)
    return scheduler


def chain_timesteps(schedule: ScheduleConfig, kind: SchedulerKind, num_inference_steps: int) -> list[int]:
    return [int(t) for t in make_scheduler(schedule, kind, num_inference_steps).timesteps]


def split_timesteps(timesteps: Sequence[int], cut: int) -> tuple[list[int], list[int]]:
    """(server's steps, client's steps) of a chain, in chain order."""
    server = [t for t in timesteps if server_evaluates(t, cut)]
    client = [t for t in timesteps if not server_evaluates(t, cut)]
    return server, client


def run_steps(
    denoiser: Denoiser,
    scheduler: DDPMScheduler | DDIMScheduler,
    x: torch.Tensor,
    labels: torch.Tensor,
    timesteps: Sequence[int],
    seed: int,
    image_indices: Sequence[int],
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Run the given (0-based) timesteps of ``scheduler`` from x; the denoiser sees the paper's t."""
    for done, ts in enumerate(timesteps, start=1):
        t_paper = torch.full((x.shape[0],), ts + 1, dtype=torch.long, device=x.device)
        with torch.no_grad():
            eps = denoiser(x, t_paper, labels)
        gens = image_generators(seed, image_indices, ts)
        if isinstance(scheduler, DDIMScheduler):
            noise = randn_tensor(x.shape, generator=gens, dtype=x.dtype).to(x.device)
            x = scheduler.step(eps, ts, x, eta=0.0, variance_noise=noise).prev_sample
        else:
            # diffusers annotates step() too narrowly: ``generator`` as one Generator (it goes to randn_tensor,
            # which takes one per image) and the result as "output or tuple" whatever return_dict says.
            x = scheduler.step(eps, ts, x, generator=gens).prev_sample  # type: ignore[arg-type,union-attr]
        if progress is not None:
            progress(done, len(timesteps))
    return x


def _chain(
    schedule: ScheduleConfig, kind: SchedulerKind, num_inference_steps: int, cut: int,
    labels: torch.Tensor, image_indices: Sequence[int] | None,
) -> tuple[DDPMScheduler | DDIMScheduler, list[int], list[int], list[int]]:
    """What both halves set up: the scheduler, (server steps, client steps) and the image indices."""
    indices = list(range(labels.shape[0])) if image_indices is None else list(image_indices)
    scheduler = make_scheduler(schedule, kind, num_inference_steps)
    server_steps, client_steps = split_timesteps([int(t) for t in scheduler.timesteps], cut)
    return scheduler, server_steps, client_steps, indices


def server_half(
    denoiser: Denoiser,
    schedule: ScheduleConfig,
    labels: torch.Tensor,
    seed: int,
    cut: int,
    num_inference_steps: int = 0,
    kind: SchedulerKind = "ddpm",
    image_shape: tuple[int, int, int] = (1, 16, 16),
    image_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """x_T -> x_hat_cut: every step with t > cut. With cut = T this is x_T itself."""
    scheduler, server_steps, _, indices = _chain(schedule, kind, num_inference_steps, cut, labels, image_indices)
    device = labels.device
    x = initial_noise(seed, indices, image_shape).to(device) * scheduler.init_noise_sigma
    return run_steps(denoiser, scheduler, x, labels, server_steps, seed, indices, progress)


def client_half(
    denoiser: Denoiser,
    schedule: ScheduleConfig,
    x_cut: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    cut: int,
    num_inference_steps: int = 0,
    kind: SchedulerKind = "ddpm",
    image_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """x_hat_cut -> x_hat_0: every step with t <= cut. With cut = 0 this returns x_cut."""
    scheduler, _, client_steps, indices = _chain(schedule, kind, num_inference_steps, cut, labels, image_indices)
    return run_steps(denoiser, scheduler, x_cut, labels, client_steps, seed, indices, progress)


def split_sample(
    server_denoiser: Denoiser,
    client_denoiser: Denoiser,
    schedule: ScheduleConfig,
    labels: torch.Tensor,
    seed: int,
    cut: int,
    num_inference_steps: int = 0,
    kind: SchedulerKind = "ddpm",
    image_shape: tuple[int, int, int] = (1, 16, 16),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole chain in one process: returns (x_hat_cut, x_hat_0)."""
    x_cut = server_half(server_denoiser, schedule, labels, seed, cut, num_inference_steps, kind, image_shape)
    x0 = client_half(client_denoiser, schedule, x_cut, labels, seed, cut, num_inference_steps, kind)
    return x_cut, x0


def count_model_evaluations(schedule: ScheduleConfig, kind: SchedulerKind, num_inference_steps: int, cut: int) -> tuple[int, int]:
    """(server evaluations, client evaluations) per image for a chain."""
    server, client = split_timesteps(chain_timesteps(schedule, kind, num_inference_steps), cut)
    return len(server), len(client)
