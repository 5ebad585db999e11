"""The one training core that the server's and the clients' trainers share.

A ``TrainCore`` owns a model, its AdamW optimizer, a learning-rate schedule (constant after a linear
warm-up), an EMA copy and the one ``torch.Generator`` every random draw of training comes from (batch
indices, label drop-out, timesteps, noise). A step takes a batch source and a loss as arguments, in
EDM's ``loss(net, batch)`` shape, so the ambient server loss and the client's DDPM loss run through the
same code: gradient clipping, bf16 autocast and the non-finite-loss guard exist here once.
Its ``state_dict`` is everything a resumed run needs to continue bit-identically (``checkpoint.py``
writes it beside the weights).

Every update passes one guard (``UpdateGuard``), whoever computed its gradient (the ambient loss here, a
split round's vector-Jacobian product, a client's loss): a gradient whose norm is NaN/Inf or above
``refuse_norm`` is refused; one far above the running norm (``spike_factor`` times it) is scaled down to
that bound, so that no single step can drive Adam's second moment to a value the following steps never
recover from; and the weights and optimizer state are copied before the step and put back if the step left
anything non-finite. A refused or undone step changes nothing (weights, optimizer, EMA, step counter).
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

from collafuse.common.config import TrainOptions
from collafuse.common.diffusion import Denoiser
from collafuse.common.models import as_denoiser

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


@dataclass(frozen=True)
class UpdateGuard:
    """What an update must pass before it is kept (the defaults are the server's ``--guard-*`` settings).

    - ``refuse_norm``: a gradient whose total L2 norm is not finite or above this is refused (0: only
      non-finite norms are refused).
    - ``spike_factor``: after ``warmup_steps`` updates, a gradient whose norm exceeds this many times the
      running norm is scaled down to that bound (0: off). The running norm is an exponential mean
      (``norm_decay``) of the norms applied, so a legitimate slow change of scale is followed while a single
      absurd step cannot raise Adam's second moment by more than a bounded factor.
    - ``undo``: copy the weights and the optimizer state before each step and put them back when the step
      left a NaN or Inf in either (costs one copy of weights and optimizer state per step).
    """

    refuse_norm: float = 1e6
    spike_factor: float = 10.0
    warmup_steps: int = 10
    norm_decay: float = 0.98
    undo: bool = True

    def __post_init__(self) -> None:
        if self.refuse_norm < 0 or self.spike_factor < 0 or self.warmup_steps < 0 or not 0 <= self.norm_decay < 1:
            raise ValueError(f"invalid update guard {self}")


class _Backup:
    """A copy of the weights and of every optimizer state tensor, taken before a step, put back after a bad one.

    Buffers are allocated once and refilled by one ``_foreach_copy_`` per step.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._layout: list[tuple[int, str]] = []  # (parameter index, state key) of each state tensor copied
        self._absent: list[int] = []  # parameters that had no optimizer state yet (their first step)

    @staticmethod
    def _tensors(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer
                 ) -> tuple[list[torch.Tensor], list[tuple[int, str]], list[int]]:
        tensors = [p.detach() for p in params]
        layout: list[tuple[int, str]] = []
        absent: list[int] = []
        for i, param in enumerate(params):
            state = optimizer.state.get(param)
            if not state:
                absent.append(i)
                continue
            for key in sorted(state):
                value = state[key]
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                    layout.append((i, key))
        return tensors, layout, absent

    def take(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        tensors, layout, absent = self._tensors(params, optimizer)
        if len(self._buffers) != len(tensors) or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(self._buffers, tensors)):
            self._buffers = [torch.empty_like(t) for t in tensors]
        with torch.no_grad():
            torch._foreach_copy_(self._buffers, tensors)
        self._layout, self._absent = layout, absent

    def restore(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        n = len(params)
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], self._buffers[:n])
            for (i, key), saved in zip(self._layout, self._buffers[n:]):
                optimizer.state[params[i]][key].copy_(saved)
        for i in self._absent:  # state the bad step created: gone again, as before it
            optimizer.state.pop(params[i], None)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf.

    One sum per tensor first (the fast path: a NaN or Inf makes its sum non-finite); only when a sum is not
    finite, which huge finite values can also cause, the exact max-abs check decides."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
    for group in groups.values():
        if bool(torch.isfinite(torch.stack([t.sum() for t in group])).all()):
            continue
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf")))).all()):
            return False
    return True


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (Adam's moments and step counts)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


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
    ``held`` when another training path had the weights frozen (nothing was drawn). ``refused`` says why
    the update guard kept nothing of the step (empty when it was applied)."""

    step: int
    loss: float | None
    held: bool = False
    refused: str = ""


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
        guard: UpdateGuard | None = None,
    ) -> None:
        self.options = options
        self.guard = guard if guard is not None else UpdateGuard()
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
        # The update guard's running gradient norm (None until the first update) and what it did.
        self.grad_norm_mean: float | None = None
        self.grad_norms_seen = 0
        self.clipped_steps = 0  # updates scaled down to spike_factor x the running norm
        self.refused_steps = 0  # updates refused (gradient norm not finite or above refuse_norm) or undone
        self.last_refusal = ""
        self._params = list(self.model.parameters())
        self._backup = _Backup()
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
            self._skipped(f"the loss is {value}")
            return StepResult(self.step, None)
        loss.backward()
        result = self._optimizer_step(value)
        if result.refused:
            self._skipped(result.refused)
        return result

    def _skipped(self, why: str) -> None:
        """Count a step that changed nothing; raise NonFiniteLoss after ``max_nonfinite_steps`` in a row."""
        self.nonfinite_in_row += 1
        self.skipped_steps += 1
        log.warning("training step %d: %s; step skipped (%d in a row, %d in all)",
                    self.step + 1, why, self.nonfinite_in_row, self.skipped_steps)
        if self.nonfinite_in_row >= self.options.max_nonfinite_steps:
            raise NonFiniteLoss(
                f"{self.nonfinite_in_row} training steps in a row had a non-finite loss or a refused update (last: "
                f"{why}) at step {self.step}: check the noise schedule (a tiny beta_start makes the ambient weight "
                "NaN), lower the learning rate or set grad_clip, then restart; the last checkpoint is intact"
            )

    def step_with_gradients(self, gradients: Sequence[torch.Tensor], loss: float | None = None) -> StepResult:
        """One optimizer step from parameter gradients computed elsewhere (a split step's server half), in
        ``model.parameters()`` order; ``loss`` (None: not known here) goes to the loss history.

        The update guard applies as to any step: a refused or undone update returns a result with ``refused``
        set and leaves the weights, the optimizer and the step counter as they were (it never raises for it)."""
        with self.model_lock:
            params = self._params
            if len(gradients) != len(params):
                raise ValueError(f"{len(gradients)} gradients for {len(params)} parameters")
            for param, grad in zip(params, gradients):
                param.grad = grad.to(param.device, param.dtype)
            result = self._optimizer_step(loss)
            if result.refused:
                self.skipped_steps += 1
                log.warning("external update at step %d refused: %s", self.step, result.refused)
            return result

    # ---- the update guard ------------------------------------------------------------------
    def _guard_gradients(self) -> str:
        """Refuse (a reason) or admit the gradients on the parameters, scaling a spike down in place."""
        guard = self.guard
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return "no parameter has a gradient"
        norm = float(torch.nn.utils.get_total_norm(grads))
        if not math.isfinite(norm):
            return f"the gradient norm is {norm} (NaN/Inf in the gradient, or too large to represent)"
        if guard.refuse_norm > 0 and norm > guard.refuse_norm:
            return f"the gradient norm {norm:.4g} is above the guard's limit {guard.refuse_norm:g}"
        applied = norm
        mean = self.grad_norm_mean
        if guard.spike_factor > 0 and mean is not None and self.grad_norms_seen >= guard.warmup_steps:
            bound = guard.spike_factor * mean
            if norm > bound > 0:
                torch._foreach_mul_(grads, bound / norm)
                applied = bound
                self.clipped_steps += 1
                log.warning("training step %d: gradient norm %.4g is %.0fx the running norm %.4g; scaled down to %.4g",
                            self.step + 1, norm, norm / mean, mean, bound)
        self.grad_norm_mean = applied if mean is None else guard.norm_decay * mean + (1 - guard.norm_decay) * applied
        self.grad_norms_seen += 1
        return ""

    def _refuse(self, why: str) -> StepResult:
        self.refused_steps += 1
        self.last_refusal = why
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(self.step, None, refused=why)

    def _optimizer_step(self, value: float | None) -> StepResult:
        """Guard, clip, step the optimizer and the lr schedule, update the EMA and the counters (gradients are
        set). A refused or undone update leaves everything as it was and returns ``refused``."""
        saved = (self.grad_norm_mean, self.grad_norms_seen)
        why = self._guard_gradients()
        if why:
            return self._refuse(why)
        if self.options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.options.grad_clip)
        if self.guard.undo:
            self._backup.take(self._params, self.optimizer)
        self.optimizer.step()
        if self.guard.undo and not all_finite([*self._params, *optimizer_tensors(self.optimizer)]):
            self._backup.restore(self._params, self.optimizer)
            self.grad_norm_mean, self.grad_norms_seen = saved
            return self._refuse("the update left NaN or Inf in the weights or the optimizer state; it was undone")
        self.lr_schedule.step()
        self.nonfinite_in_row = 0
        with self._lock:
            self.ema.update(self.model, self.step)
            self.step += 1
            if value is not None:
                self.losses.append((self.step, value))
        return StepResult(self.step, value)

    def finite(self) -> bool:
        """Whether the weights, the EMA weights and the optimizer state hold no NaN or Inf."""
        return all_finite([*self._params, *self.ema.model.parameters(), *optimizer_tensors(self.optimizer)])

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
            "guard": {"grad_norm_mean": self.grad_norm_mean, "grad_norms_seen": self.grad_norms_seen,
                      "clipped_steps": self.clipped_steps, "refused_steps": self.refused_steps},
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
        guard = state.get("guard") or {}  # absent in checkpoints written before the update guard
        mean = guard.get("grad_norm_mean")
        self.grad_norm_mean = None if mean is None else float(mean)
        self.grad_norms_seen = int(guard.get("grad_norms_seen", 0))
        self.clipped_steps = int(guard.get("clipped_steps", 0))
        self.refused_steps = int(guard.get("refused_steps", 0))
