"""The split sampler (docs/design.md §5): small pure functions of a denoiser, the cut is an argument.

A request builds its ``Chain`` once: the scheduler with ``set_timesteps(N)`` applied
and its 0-based timesteps in chain order, the grid shifted so that the hand-off level
is exactly the cut (``handoff_offset``). Each timestep i belongs to the server
when i + 1 > cut and to the client otherwise, so the server's steps are a prefix
of the chain and the client's the rest; the samplers run a slice of it, as
k-diffusion's samplers run a slice of ``sigmas``.

Noise is derived per image from (seed, image index, timestep): the generator of
image j at 0-based timestep i is seeded with the first 8 bytes (little-endian,
top bit cleared) of SHA-256 of ``f"{seed}:{j}:{i}"``, and x_T uses i = -1. So the
result does not depend on which side runs a step (``handoff_sample`` equals
``client_half(server_half(...))`` bit for bit), and on how images are batched only through
the float rounding of a different batch (about 1e-6 relative; docs/design.md §5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler  # not `diffusers`: see common/models.py
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from collafuse.common.diffusion import Denoiser
from collafuse.common.schedule import ScheduleConfig, SchedulerKind, server_evaluates

# Called after each step with (steps_done, steps_total).
ProgressFn = Callable[[int, int], None]
INITIAL_TIMESTEP = -1  # the "timestep" tag of x_T's noise


def derive_seed(seed: int, image_index: int, timestep: int) -> int:
    """A 63-bit seed from (request seed, image index, timestep)."""
    digest = hashlib.sha256(f"{seed}:{image_index}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_generators(seed: int, image_indices: Sequence[int], timestep: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, int(j), timestep)) for j in image_indices]


def initial_noise(seed: int, image_indices: Sequence[int], image_shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T ~ N(0, I), one generator per image."""
    gens = image_generators(seed, image_indices, INITIAL_TIMESTEP)
    return randn_tensor((len(gens), *image_shape), generator=gens, dtype=torch.float32)


@dataclass(frozen=True)
class Chain:
    """One request's scheduler with its (strided) timesteps set: built once, then sliced at the cut."""

    scheduler: DDPMScheduler | DDIMScheduler
    timesteps: tuple[int, ...]  # diffusers' 0-based timesteps, in chain order (descending)

    def split(self, cut: int) -> tuple[list[int], list[int]]:
        """(server's steps: t > cut, x_T -> x_hat_cut; client's steps: t <= cut, x_hat_cut -> x_hat_0)."""
        return timesteps_by_owner(self.timesteps, cut)

    def server_steps(self, cut: int) -> list[int]:
        return self.split(cut)[0]

    def client_steps(self, cut: int) -> list[int]:
        return self.split(cut)[1]

    def evaluations(self, cut: int) -> tuple[int, int]:
        """(server, client) denoiser evaluations per image (times two with classifier-free guidance)."""
        server, client = self.split(cut)
        return len(server), len(client)


def handoff_offset(num_train_timesteps: int, num_inference_steps: int, cut: int) -> int:
    """The grid shift (diffusers' ``steps_offset``) that puts the hand-off exactly at the cut.

    diffusers' "leading" grid is ``k * s + offset`` (s = T // N, 0-based). With offset = (cut - 1) mod s,
    0-based cut - 1 (the paper's t = cut) is a grid point: the server's last step, from cut - 1 + s, lands on
    x_cut exactly, and the client's first step starts there. Every step keeps the stride s. At cut 0 (the
    server does everything) and cut T (the client does) there is no hand-off: offset 0.
    """
    if not 0 < cut < num_train_timesteps:
        return 0
    return (cut - 1) % (num_train_timesteps // num_inference_steps)


def make_chain(schedule: ScheduleConfig, kind: SchedulerKind, num_inference_steps: int, cut: int) -> Chain:
    """The shared scheduler with its strided timesteps set, the hand-off at ``cut`` one of them; 0 steps
    means all T. Both sides build it from the same four arguments."""
    steps = num_inference_steps or schedule.num_train_timesteps
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"num_inference_steps {steps} must lie in [1, {schedule.num_train_timesteps}]")
    scheduler = schedule.scheduler(kind, steps_offset=handoff_offset(schedule.num_train_timesteps, steps, cut))
    scheduler.set_timesteps(steps)
    return Chain(scheduler, tuple(int(t) for t in scheduler.timesteps))


def sample_steps(
    denoiser: Denoiser,
    scheduler: DDPMScheduler | DDIMScheduler,
    x: torch.Tensor,
    labels: torch.Tensor,
    timesteps: Sequence[int],
    seed: int,
    image_indices: Sequence[int],
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Run a slice of a chain's (0-based) timesteps from x; the denoiser sees the paper's t = i + 1."""
    for done, ts in enumerate(timesteps, start=1):
        x = denoise_step(denoiser, scheduler, x, labels, ts, image_generators(seed, image_indices, ts))
        if progress is not None:
            progress(done, len(timesteps))
    return x


def denoise_step(
    denoiser: Denoiser,
    scheduler: DDPMScheduler | DDIMScheduler,
    x: torch.Tensor,
    labels: torch.Tensor,
    ts: int,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """One chain step x_t -> x_{t-1} at 0-based timestep ts, image j's noise from ``generators[j]``.

    Every image's result depends only on its own row and generator, so a batch may hold images of
    several requests (server/sampler.py merges them) without changing any of them beyond float rounding.
    """
    t_paper = torch.full((x.shape[0],), ts + 1, dtype=torch.long, device=x.device)
    with torch.no_grad():
        eps = denoiser(x, t_paper, labels)
    if isinstance(scheduler, DDIMScheduler):
        noise = randn_tensor(x.shape, generator=generators, dtype=x.dtype).to(x.device)
        return scheduler.step(eps, ts, x, eta=0.0, variance_noise=noise).prev_sample
    # diffusers annotates step() too narrowly: ``generator`` as one Generator (it goes to randn_tensor,
    # which takes one per image) and the result as "output or tuple" whatever return_dict says.
    return scheduler.step(eps, ts, x, generator=generators).prev_sample  # type: ignore[arg-type,union-attr]


def _indices(labels: torch.Tensor, image_indices: Sequence[int] | None) -> list[int]:
    return list(range(labels.shape[0])) if image_indices is None else [int(j) for j in image_indices]


def server_half(
    denoiser: Denoiser,
    chain: Chain,
    labels: torch.Tensor,
    seed: int,
    cut: int,
    image_shape: tuple[int, int, int],
    image_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """x_T -> x_hat_cut: every step with t > cut. With cut = T this is x_T itself."""
    indices = _indices(labels, image_indices)
    x = initial_noise(seed, indices, image_shape).to(labels.device) * chain.scheduler.init_noise_sigma
    return sample_steps(denoiser, chain.scheduler, x, labels, chain.server_steps(cut), seed, indices, progress)


def client_half(
    denoiser: Denoiser,
    chain: Chain,
    x_cut: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    cut: int,
    image_indices: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """x_hat_cut -> x_hat_0: every step with t <= cut. With cut = 0 this returns x_cut."""
    indices = _indices(labels, image_indices)
    return sample_steps(denoiser, chain.scheduler, x_cut, labels, chain.client_steps(cut), seed, indices, progress)


def handoff_sample(
    server_denoiser: Denoiser,
    client_denoiser: Denoiser,
    chain: Chain,
    labels: torch.Tensor,
    seed: int,
    cut: int,
    image_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole chain in one process: returns (x_hat_cut, x_hat_0)."""
    x_cut = server_half(server_denoiser, chain, labels, seed, cut, image_shape)
    return x_cut, client_half(client_denoiser, chain, x_cut, labels, seed, cut)


def timesteps_by_owner(timesteps: Sequence[int], cut: int) -> tuple[list[int], list[int]]:
    """(server's steps, client's steps) of a chain, in chain order."""
    server = [t for t in timesteps if server_evaluates(t, cut)]
    return server, [t for t in timesteps if not server_evaluates(t, cut)]

