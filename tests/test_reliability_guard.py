"""No single client can break the model (issue 16): the training core's update guard and the split strikes.

The core refuses a gradient whose norm is NaN/Inf or absurd (nothing of the step is kept), scales a spike far
above the running norm down (Adam's second moment stays where the next steps recover from it), and undoes a
step that left NaN/Inf; its running statistic is part of the resumable state. Over gRPC, a split client that
keeps sending refused gradients is dropped for a while, the server's weights stay finite, and a client's gradient
rows are bounded relative to the other clients' (one vote each).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from server_support import SHAPE, start

from collafuse.common.codec import decode, encode
from collafuse.common.config import TrainOptions
from collafuse.common.models import build_unet
from collafuse.common.train_loop import TrainCore, UpdateGuard, optimizer_tensors, seeded
from collafuse.server.gradient_bounds import RowNormBook
from collafuse.server.protocols.split import SplitProtocol
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)
CPU = torch.device("cpu")
CUT = 20
Code = grpc.StatusCode

# A fixed held-out batch to compare models on.
_FIXED = torch.Generator().manual_seed(123)
X_EVAL, EPS_EVAL = torch.randn((32, *SHAPE), generator=_FIXED), torch.randn((32, *SHAPE), generator=_FIXED)
T_EVAL = torch.randint(1, 50, (32,), generator=_FIXED)


def make_core(guard: UpdateGuard | None = None) -> TrainCore:
    model = seeded(0, lambda: build_unet("tiny", SHAPE, 3))
    return TrainCore(model, TrainOptions(lr=2e-3), CPU, guard=guard)


def gradients(core: TrainCore, gen: torch.Generator) -> tuple[list[torch.Tensor], float]:
    """The parameter gradients of a denoising loss on a fresh batch (what a split round hands the core)."""
    x, eps = torch.randn((16, *SHAPE), generator=gen), torch.randn((16, *SHAPE), generator=gen)
    t = torch.randint(1, 50, (16,), generator=gen)
    params = list(core.model.parameters())
    loss = (core.net(0.7 * x + 0.7 * eps, t, torch.zeros(16, dtype=torch.long)) - eps).pow(2).mean()
    grads = torch.autograd.grad(loss, params)
    return list(grads), float(loss.detach())


def eval_loss(core: TrainCore) -> float:
    with torch.no_grad():
        eps_hat = core.net(0.7 * X_EVAL + 0.7 * EPS_EVAL, T_EVAL, torch.zeros(32, dtype=torch.long))
    return float((eps_hat - EPS_EVAL).pow(2).mean())


def train(core: TrainCore, gen: torch.Generator, steps: int) -> None:
    for _ in range(steps):
        core.step_with_gradients(*gradients(core, gen))


def everything(core: TrainCore) -> list[torch.Tensor]:
    """Weights, EMA weights and optimizer state, copied."""
    return [t.detach().clone() for t in (*core.model.parameters(), *core.ema.model.parameters(),
                                         *optimizer_tensors(core.optimizer))]


def unchanged(before: list[torch.Tensor], core: TrainCore) -> bool:
    after = everything(core)
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("scale", [3e38, 1e20, float("nan")])
def test_absurd_or_non_finite_gradients_are_refused_and_change_nothing(scale: float) -> None:
    """The issue's 3e38 turned the weights NaN and 1e20 froze 472 parameters for good; both are refused now."""
    core, gen = make_core(), torch.Generator().manual_seed(0)
    train(core, gen, 3)
    before, step = everything(core), core.step
    grads, loss = gradients(core, gen)
    result = core.step_with_gradients([g * scale for g in grads], loss)
    assert result.refused and result.loss is None and result.step == step == core.step
    assert unchanged(before, core), "a refused update must leave weights, EMA and optimizer state as they were"
    assert core.refused_steps == 1 and core.finite()
    assert core.step_with_gradients(*gradients(core, gen)).refused == "", "the next ordinary step is applied"


def test_a_gradient_above_the_refuse_norm_is_refused() -> None:
    core, gen = make_core(UpdateGuard(refuse_norm=1.0)), torch.Generator().manual_seed(0)
    before = everything(core)
    result = core.step_with_gradients(*gradients(core, gen))  # a fresh tiny UNet's gradient norm is about 3
    assert "above the guard's limit 1" in result.refused and unchanged(before, core) and core.step == 0


def test_a_spike_is_scaled_down_and_adam_recovers() -> None:
    """A 10,000x gradient after 15 steps: unguarded, Adam's second moment jumps ~1e6-fold and the model is still
    35% worse 25 steps later; guarded, the step is scaled to 10x the running norm and the model ends within a
    few percent of a clean run."""
    def run(guard: UpdateGuard, spike: float | None) -> tuple[TrainCore, float]:
        core, gen = make_core(guard), torch.Generator().manual_seed(0)
        train(core, gen, 15)
        if spike is not None:
            grads, loss = gradients(core, gen)
            core.step_with_gradients([g * spike for g in grads], loss)
        train(core, gen, 25)
        v_max = max(float(core.optimizer.state[p]["exp_avg_sq"].max()) for p in core.model.parameters())
        return core, v_max

    clean, clean_v = run(UpdateGuard(), None)
    guarded, guarded_v = run(UpdateGuard(), 1e4)
    unguarded, unguarded_v = run(UpdateGuard(refuse_norm=0, spike_factor=0), 1e4)
    assert guarded.clipped_steps == 1 and unguarded.clipped_steps == 0 and clean.clipped_steps == 0
    assert unguarded_v > 1e4 * clean_v, "the unguarded spike should have driven Adam's second moment up"
    assert guarded_v < 100 * clean_v
    assert eval_loss(unguarded) > 1.15 * eval_loss(clean), "the unguarded spike should still hurt"
    assert eval_loss(guarded) < 1.04 * eval_loss(clean)


def test_a_step_that_leaves_nan_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    core, gen = make_core(), torch.Generator().manual_seed(0)
    train(core, gen, 2)
    before, step, stat = everything(core), core.step, (core.grad_norm_mean, core.grad_norms_seen)
    real_step = core.optimizer.step

    def poisoned_step(*args: Any, **kwargs: Any) -> Any:
        out = real_step(*args, **kwargs)
        with torch.no_grad():
            next(core.model.parameters()).view(-1)[0] = float("nan")  # e.g. an overflow inside the optimizer
        return out

    monkeypatch.setattr(core.optimizer, "step", poisoned_step)
    result = core.step_with_gradients(*gradients(core, gen))
    assert "undone" in result.refused and core.step == step
    assert unchanged(before, core) and core.finite()
    assert (core.grad_norm_mean, core.grad_norms_seen) == stat, "an undone step does not move the running norm"


def test_the_first_step_is_undone_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its first step the optimizer has no state: undoing that step removes the state it created."""
    core, gen = make_core(), torch.Generator().manual_seed(0)
    real_step = core.optimizer.step

    def poisoned_step(*args: Any, **kwargs: Any) -> Any:
        out = real_step(*args, **kwargs)
        next(iter(core.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return out

    monkeypatch.setattr(core.optimizer, "step", poisoned_step)
    before = everything(core)
    assert core.step_with_gradients(*gradients(core, gen)).refused
    assert not core.optimizer.state and unchanged(before, core)


def test_the_running_norm_resumes_bit_identically() -> None:
    """15 steps straight equal 8 steps, a state_dict round trip (as a checkpoint does) and 7 more: the guard's
    running norm decides clipping after its warm-up, so it is part of the resumable state."""
    straight, gen = make_core(UpdateGuard(warmup_steps=2, spike_factor=1.5)), torch.Generator().manual_seed(0)
    train(straight, gen, 15)
    first, gen2 = make_core(UpdateGuard(warmup_steps=2, spike_factor=1.5)), torch.Generator().manual_seed(0)
    train(first, gen2, 8)
    resumed = TrainCore(copy.deepcopy(first.model), TrainOptions(lr=2e-3), CPU, guard=first.guard)
    resumed.ema.model.load_state_dict(first.ema.model.state_dict())
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert (resumed.grad_norm_mean, resumed.grad_norms_seen) == (first.grad_norm_mean, first.grad_norms_seen)
    train(resumed, gen2, 7)
    assert straight.clipped_steps > 0, "the test needs clipping decisions after the round trip"
    assert resumed.clipped_steps == straight.clipped_steps
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)


# ---- split strikes over gRPC ----------------------------------------------------------------------------


# The split servers here get gradients against random targets: the check of each step against the server's own
# objective (tests/test_split_poisoning.py) would leave them out, and it is not these tests' subject.
NO_TRUST_CHECK = {"split_trust_window": 0}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    srv = start(tmp_path / "store", start_trainer=False, label_dropout=0.0, max_steps=100, split_round_timeout=5.0,
                split_max_strikes=3, split_strike_cooldown=60.0, **NO_TRUST_CHECK)
    yield srv
    srv.stop(0)


def _api(server: Any) -> collafuse_pb2_grpc.CollaFuseStub:
    from server_support import stub

    return stub(server)


def _forward(api: collafuse_pb2_grpc.CollaFuseStub, client_id: str, seed: int) -> collafuse_pb2.SplitForwardReply:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *SHAPE), generator=g)
    return api.SplitForward(collafuse_pb2.SplitForwardRequest(client_id=client_id, x_t=encode(x), t=[CUT + 5, 40],
                                                              labels=[0, 1]), timeout=30)


def _backward(api: collafuse_pb2_grpc.CollaFuseStub, client_id: str, reply: collafuse_pb2.SplitForwardReply,
              scale: float = 1.0) -> collafuse_pb2.SplitBackwardReply:
    eps_hat = decode(reply.eps_hat)
    grad = (eps_hat - torch.randn(eps_hat.shape, generator=torch.Generator().manual_seed(1))) * 2 / eps_hat.numel()
    return api.SplitBackward(collafuse_pb2.SplitBackwardRequest(client_id=client_id, step_id=reply.step_id,
                                                                grad=encode(grad * scale)), timeout=30)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


def test_a_split_client_that_keeps_sending_refused_gradients_is_dropped(server: Any) -> None:
    api = _api(server)
    for client_id in ("mallory", "alice"):
        api.Register(collafuse_pb2.RegisterRequest(client_id=client_id, cut=CUT, protocol=collafuse_pb2.PROTOCOL_SPLIT,
                                                   class_names=["a", "b", "c"]), timeout=10)
    reply = _forward(api, "mallory", 0)
    codes = [_code(lambda: _backward(api, "mallory", reply, scale=3e38)) for _ in range(3)]
    assert [c for c, _ in codes] == [Code.INVALID_ARGUMENT] * 3 and "--split-max-grad-norm" in codes[0][1]
    # The third refusal in a row dropped mallory: every split call is now refused at once, a valid one included.
    for call in (lambda: _backward(api, "mallory", reply), lambda: _forward(api, "mallory", 1)):
        code, details = _code(call)
        assert code == Code.FAILED_PRECONDITION and "dropped from split training after 3 refused steps" in details
    mine = {c.client_id: c for c in api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients}
    assert mine["mallory"].strikes == 3 and mine["mallory"].dropped_until > 0
    assert mine["alice"].strikes == 0 and mine["alice"].dropped_until == 0
    # Mallory's pending step holds its round until the deadline (5 s), then alice trains alone; weights stay finite.
    for seed in range(2):
        ack = _backward(api, "alice", _forward(api, "alice", seed))
        assert ack.applied
    assert server.trainer.core.step >= 2 and server.trainer.core.finite()


def test_an_applied_step_clears_the_strikes(server: Any) -> None:
    api = _api(server)
    api.Register(collafuse_pb2.RegisterRequest(client_id="clumsy", cut=CUT, protocol=collafuse_pb2.PROTOCOL_SPLIT,
                                               class_names=["a", "b", "c"]), timeout=10)
    for seed in range(3):
        reply = _forward(api, "clumsy", seed)
        for _ in range(2):  # two refusals, then a good gradient: never three in a row
            refused = _code(lambda r=reply: _backward(api, "clumsy", r, scale=float("inf")))  # type: ignore[misc]
            assert refused[0] == Code.INVALID_ARGUMENT
        assert _backward(api, "clumsy", reply).applied
    assert server.servicer.strikes.status("clumsy") == (0, 0.0)


def test_the_split_soft_cap_scales_rows_down_before_the_round(tmp_path: Path) -> None:
    """--split-clip-grad-norm: rows between the soft cap and the hard limit are scaled to the cap (the step is
    applied, with the scaled gradient); rows above the hard limit are still refused."""
    srv = start(tmp_path / "store", start_trainer=False, label_dropout=0.0, max_steps=100, split_clip_grad_norm=0.5,
                split_max_grad_norm=1000.0, **NO_TRUST_CHECK)
    try:
        api = _api(srv)
        api.Register(collafuse_pb2.RegisterRequest(client_id="c", cut=CUT, protocol=collafuse_pb2.PROTOCOL_SPLIT,
                                                   class_names=["a", "b", "c"]), timeout=10)
        protocol = srv.servicer.protocols[collafuse_pb2.PROTOCOL_SPLIT]
        assert isinstance(protocol, SplitProtocol)
        engine = protocol.engine
        seen: list[torch.Tensor] = []
        real_checked = engine._checked

        def checked(step: Any, grad: torch.Tensor) -> torch.Tensor:
            seen.append(grad.clone())
            return real_checked(step, grad)

        engine._checked = checked  # type: ignore[method-assign]
        reply = _forward(api, "c", 0)
        assert _backward(api, "c", reply, scale=200.0).applied
        rows = seen[-1].flatten(1).norm(dim=1) * seen[-1].shape[0]
        assert torch.allclose(rows, torch.full_like(rows, 0.5), rtol=1e-4)
        reply = _forward(api, "c", 1)
        assert _code(lambda: _backward(api, "c", reply, scale=1e9))[0] == Code.INVALID_ARGUMENT
    finally:
        srv.stop(0)


def _rows(norms: list[float], size: int = 64) -> torch.Tensor:
    """A batch-mean gradient whose image rows have the given norms (times the batch size)."""
    g = torch.Generator().manual_seed(len(norms))
    rows = torch.randn((len(norms), size), generator=g)
    rows = rows / rows.norm(dim=1, keepdim=True) * torch.tensor(norms).view(-1, 1)
    return (rows / len(norms)).view(len(norms), 1, 8, 8)


def _norms(grad: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in grad.flatten(1).norm(dim=1) * grad.shape[0]]


def test_a_clients_rows_are_bounded_by_the_other_clients_median() -> None:
    """Two honest clients with rows near 0.25 and one sending rows 4,000x larger (below the hard limit): the
    reference is the lower median of the per-client medians, so the large rows are scaled to 10x 0.25 and the
    honest ones are untouched; rows above the hard limit are left for the engine to refuse."""
    book = RowNormBook(factor=10.0)
    honest = [0.2, 0.25, 0.3, 0.25]
    for _ in range(2):
        for client in ("alice", "bob"):
            grad = _rows(honest)
            assert book.bound(client, grad, hard_limit=1000.0) is grad  # untouched, not even copied
    attack = book.bound("mallory", _rows([999.0] * 4), hard_limit=1000.0)
    assert _norms(attack) == [2.5] * 4 and book.clipped_rows == 4
    for _ in range(10):  # mallory's own median is high, but it is one vote of three: the reference stays honest
        book.bound("mallory", _rows([999.0] * 4), hard_limit=1000.0)
    assert book.reference() == pytest.approx(0.25, rel=0.01)
    grad = _rows(honest)
    assert book.bound("alice", grad, hard_limit=1000.0) is grad
    huge = _rows([5000.0] * 4)
    assert book.bound("mallory", huge, hard_limit=1000.0) is huge
    book.forget("mallory")
    assert book.reference() == pytest.approx(0.25, rel=0.01)


def test_a_lone_client_has_only_its_spikes_bounded() -> None:
    book = RowNormBook(factor=10.0)
    for _ in range(2):
        book.bound("solo", _rows([1.0] * 4), hard_limit=1000.0)
    assert _norms(book.bound("solo", _rows([1.0, 50.0]), hard_limit=1000.0)) == [1.0, 10.0]
    assert RowNormBook(factor=0.0).bound("x", _rows([999.0]), hard_limit=1000.0).abs().sum() > 0  # off: untouched
