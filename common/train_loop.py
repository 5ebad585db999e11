"""The one training core that the server's and the clients' trainers share.

A ``TrainCore`` owns a model, its AdamW optimizer, a learning-rate schedule (constant after a linear
warm-up), an EMA copy and the one ``torch.Generator`` every random draw of training comes from (batch
indices, label drop-out, timesteps, noise). A step takes a batch source and a loss as arguments, in
EDM's ``loss(net, batch)`` shape, so the ambient server loss and the client's DDPM loss run through the
same code: gradient clipping, bf16 autocast and the non-finite-loss guard exist here once.
Its ``state_dict`` is everything a resumed run needs to continue bit-identically (``checkpoint.py``
writes it beside the weights).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from diffusers.models import UNet2DModel

from collafuse.common.diffusion import Denoiser
from collafuse.common.models import as_denoiser
from collafuse.common.settings import TrainOptions

log = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)
B = TypeVar("B")
B_contra = TypeVar("B_contra", contravariant=True)


class Loss(Protocol[B_contra]):
    """``loss(net, batch, generator)``: a scalar to minimise; all its randomness comes from ``generator``."""

    def __call__(self, net: Denoiser, batch: B_contra, generator: torch.Generator) -> torch.Tensor: ...


# A batch source draws one minibatch with the core's generator.
BatchSource = Callable[[torch.Generator], B]


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a NaN or Inf loss: training stopped instead of drifting."""


class Ema(Generic[M]):
    """EMA of a model's weights with diffusers' warm-up (decay <= (1 + n) / (10 + n)), so short runs move.

    ``model`` is a frozen copy (no gradients, eval mode) of the model it was made from.
    """

    def __init__(self, model: M, decay: float) -> None:
        self.model: M = copy.deepcopy(model)
        self.model.requires_grad_(False).train(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Move towards ``model``'s weights after the optimizer step of 0-based training step ``step``."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with the fused kernel: plain AdamW's per-parameter loop takes 12 ms of a 75 ms tiny-UNet
    step on one CPU thread, the fused kernel 4 ms (measured on the 2-core box, batch 16 at 8x8)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def seeded(seed: int, build: Callable[[], M]) -> M:
    """``build()`` under a fixed global seed, leaving the caller's RNG untouched (same settings, same model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """bf16 where asked for and the device runs it; None means full precision."""
    if mode == "off":
        return None
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if mode == "bf16":
        if device.type == "cpu":
            return torch.bfloat16  # asked for explicitly: CPU autocast supports bf16, slowly
        log.warning("mixed_precision=bf16 is not supported on %s; training in full precision", device)
    return None


@dataclass(frozen=True)
class StepResult:
    """One call of ``TrainCore.train_step``: ``loss`` is None when the step was skipped (non-finite), or
    ``held`` when another training path had the weights frozen (nothing was drawn)."""

    step: int
    loss: float | None
    held: bool = False


class TrainCore:
    """Model, optimizer, lr schedule, EMA and generator; ``train_step``/``run`` are the one training loop.

    ``lock`` (optional) guards what readers in other threads see: the EMA weights, ``step`` and ``losses``.
    """

    def __init__(
        self,
        model: UNet2DModel,
        options: TrainOptions,
        device: torch.device,
        *,
        ema: Ema[Any] | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.options = options
        self.device = device
        torch.nn.Module.to(model, device)  # in place; diffusers types its own .to oddly
        self.model = model.train()
        self.net = as_denoiser(self.model)  # what the loss calls: eps_hat(x_t, t, y) with the paper's t
        self.ema: Ema[Any] = ema if ema is not None else Ema(self.model, options.ema_decay)
        self.optimizer = make_optimizer(self.model, options.lr, options.weight_decay)
        warmup = options.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup) if warmup > 0 else 1.0
        )
        self.generator = torch.Generator().manual_seed(options.seed)
        self.amp_dtype = autocast_dtype(device, options.mixed_precision)
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.saved_step = -1  # the step of the last checkpoint written or resumed from
        self._lock = lock if lock is not None else threading.Lock()
        # Held for a whole optimizer step by the background trainer and by split steps (server/protocols/split.py):
        # both update this one model, and a copy of the weights must never see a half-applied step.
        self.model_lock = threading.RLock()
        self._reduce_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
        # True while another training path (a split round, server/protocols/split_rounds.py) needs the weights as
        # they are; checked under model_lock, so it must not block.
        self.frozen: Callable[[], bool] = lambda: False

    def replicate(
        self, wrap: Callable[[torch.nn.Module], torch.nn.Module], reduce_loss: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Data-parallel training (``server/distributed.py``): forward passes go through ``wrap(model)`` (DDP,
        which averages gradients over the ranks) and ``reduce_loss`` averages the loss over them, so that every
        rank skips a non-finite step together. The optimizer, EMA and checkpoints keep the bare model."""
        self.net = as_denoiser(self.model, forward=wrap(self.model))
        self._reduce_loss = reduce_loss

    # ---- one step -------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: BatchSource[B], loss_fn: Loss[B]) -> StepResult:
        """Draw a batch, compute the loss and step, unless the loss is NaN/Inf: then skip and count it.

        Raises ``NonFiniteLoss`` after ``max_nonfinite_steps`` skipped steps in a row.
        """
        with self.model_lock:
            return self._train_step(batches, loss_fn)

    def _train_step(self, batches: BatchSource[B], loss_fn: Loss[B]) -> StepResult:
        if self.frozen():
            return StepResult(self.step, None, held=True)
        batch = batches(self.generator)
        with self._autocast():
            loss = loss_fn(self.net, batch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        value = float(self._reduce_loss(loss.detach()))
        if not math.isfinite(value):
            self.nonfinite_in_row += 1
            self.skipped_steps += 1
            log.warning("training step %d: the loss is %s; step skipped (%d in a row, %d in all)",
                        self.step + 1, value, self.nonfinite_in_row, self.skipped_steps)
            if self.nonfinite_in_row >= self.options.max_nonfinite_steps:
                raise NonFiniteLoss(
                    f"{self.nonfinite_in_row} training steps in a row had a non-finite loss (last: {value}) at "
                    f"step {self.step}: check the noise schedule (a tiny beta_start makes the ambient weight "
                    "NaN), lower the learning rate or set grad_clip, then restart; the last checkpoint is intact"
                )
            return StepResult(self.step, None)
        loss.backward()
        return self._optimizer_step(value)

    def step_with_gradients(self, gradients: Sequence[torch.Tensor], loss: float | None = None) -> StepResult:
        """One optimizer step from parameter gradients computed elsewhere (a split step's server half), in
        ``model.parameters()`` order; ``loss`` (None: not known here) goes to the loss history."""
        with self.model_lock:
            params = list(self.model.parameters())
            if len(gradients) != len(params):
                raise ValueError(f"{len(gradients)} gradients for {len(params)} parameters")
            for param, grad in zip(params, gradients):
                param.grad = grad.to(param.device, param.dtype)
            return self._optimizer_step(loss)

    def _optimizer_step(self, value: float | None) -> StepResult:
        """Clip, step the optimizer and the lr schedule, update the EMA and the counters (gradients are set)."""
        if self.options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.nonfinite_in_row = 0
        with self._lock:
            self.ema.update(self.model, self.step)
            self.step += 1
            if value is not None:
                self.losses.append((self.step, value))
        return StepResult(self.step, value)

    def run(
        self,
        batches: BatchSource[B],
        loss_fn: Loss[B],
        *,
        until: int,
        keep_going: Callable[[], bool] = lambda: True,
        checkpoint: Callable[[], object] | None = None,
        checkpoint_every: int = 0,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        """Train until ``step == until`` (``until`` 0: until ``keep_going()`` says stop).

        ``checkpoint()`` runs every ``checkpoint_every`` steps; the final one is the caller's (it knows
        whether an interrupted run should keep its progress).
        """
        while (until <= 0 or self.step < until) and keep_going():
            result = self.train_step(batches, loss_fn)
            if result.held:
                return
            if on_step is not None:
                on_step(result)
            if (
                checkpoint is not None and result.loss is not None and checkpoint_every > 0
                and self.step % checkpoint_every == 0 and self.step != self.saved_step
            ):
                checkpoint()

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a bit-identical resume needs."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),
            "losses": [[s, v] for s, v in self.losses],
            "nonfinite_in_row": self.nonfinite_in_row,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "lr_schedule" in state:  # absent in checkpoints written before the core had a schedule
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        self.step = self.saved_step = int(state["step"])
        self.losses = [(int(s), float(v)) for s, v in state.get("losses", [])]
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
