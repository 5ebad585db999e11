"""The split protocol (docs/design.md §3-§4): a round is one optimizer step of the pooled mean loss at the weights
its forwards saw (checked against autograd), arrival order and merging change nothing, rounds are bounded and
close at a deadline, validation, the client's send guard, DP clipping before anything leaves, the privacy
budget, and a lifecycle run with --protocol split."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from client_fake_server import make_image_folder
from server_support import SHAPE, T, chunks, rpc_error, start, stub, upload

from collafuse.client.dp import epsilon_of_mu2, gaussian_mu, release_epsilon
from collafuse.client.errors import ClientError
from collafuse.client.ledger import Ledger, ReleaseLevel, SentItem
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.privacy_ledger import PrivacyLedger, privacy_report
from collafuse.client.protocols import client_protocol
from collafuse.client.protocols import split as client_split
from collafuse.client.protocols.split import (
    NoisedBatch,
    SplitClient,
    SplitOptions,
    UnsafeSend,
    forward_request,
    guard_outgoing,
    loss_gradient,
    noise_batch,
)
from collafuse.common.codec import decode, encode
from collafuse.common.config import ClientSettings, TrainOptions
from collafuse.common.models import build_unet, load_model
from collafuse.common.rpc import RETRY_AFTER_KEY
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.train_loop import StepResult, TrainCore
from collafuse.server.errors import RequestRefused
from collafuse.server.protocols import split_rounds
from collafuse.server.protocols.split_merge import ForwardMerger
from collafuse.server.protocols.split_rounds import RoundLimits, SplitEngine
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
CUT = 20
Code = grpc.StatusCode
SCHEDULE = ScheduleConfig(num_train_timesteps=T)
ALPHAS = SCHEDULE.alphas_cumprod()
FLOOR = float(ALPHAS[CUT])


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    srv = start(tmp_path / "store", start_trainer=False, label_dropout=0.0, max_steps=100, split_round_timeout=30.0)
    yield srv
    srv.stop(0)


def _register(s: Any, client_id: str, protocol: collafuse_pb2.Protocol = collafuse_pb2.PROTOCOL_SPLIT, classes: tuple[str, ...] = ("a", "b", "c")) -> None:
    s.Register(collafuse_pb2.RegisterRequest(client_id=client_id, cut=CUT, protocol=protocol, class_names=list(classes)),
               timeout=10)


def _batch(seed: int, n: int = 4) -> NoisedBatch:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    t = torch.randint(CUT + 1, T + 1, (n,), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return noise_batch(x0, t, labels, eps, ALPHAS, CUT)


def _reference_grads(model: torch.nn.Module, batch: NoisedBatch) -> list[torch.Tensor]:
    """In-process autograd of the client's loss mse(eps_hat, eps) on the same batch."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    eps_hat = model(batch.x_t, batch.t - 1, class_labels=batch.labels).sample
    torch.nn.functional.mse_loss(eps_hat, batch.eps).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(got, want)))
    norm = math.sqrt(sum(float(b.pow(2).sum()) for b in want))
    return diff / norm


def _engine(server: Any) -> SplitEngine:
    return server.servicer.protocols[collafuse_pb2.PROTOCOL_SPLIT].engine


def _forward(s: Any, client_id: str, batch: NoisedBatch) -> collafuse_pb2.SplitForwardReply:
    return s.SplitForward(forward_request(client_id, batch, CUT, FLOOR, ALPHAS), timeout=30)


def _backward(s: Any, client_id: str, batch: NoisedBatch, reply: collafuse_pb2.SplitForwardReply,
              last: bool = False) -> collafuse_pb2.SplitBackwardReply:
    rows, loss = loss_gradient(decode(reply.eps_hat), batch.eps)
    grad = rows / rows.shape[0]
    return s.SplitBackward(collafuse_pb2.SplitBackwardRequest(client_id=client_id, step_id=reply.step_id, grad=encode(grad),
                                                              loss=loss, last=last), timeout=30)


def _concat(batches: Sequence[NoisedBatch]) -> NoisedBatch:
    cat = [torch.cat([getattr(b, f) for b in batches]) for f in ("x0", "t", "labels", "eps")]
    return noise_batch(cat[0], cat[1], cat[2], cat[3], ALPHAS, CUT)


def _in_threads(calls: Sequence[Callable[[], Any]], stagger: float = 0.0) -> list[Any]:
    """Run each call in its own thread (started in order, ``stagger`` s apart); their results, or raise."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = calls[k]()
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


# ---- exactness: one round is one step of the mean loss over its images, at the weights its forwards saw ----


def test_one_split_step_gives_the_in_process_gradient(server: Any) -> None:
    s = stub(server)
    _register(s, "c0")
    model = server.trainer.core.model
    before = copy.deepcopy(model)
    batch = _batch(1)
    reply = _forward(s, "c0", batch)
    with torch.no_grad():
        assert torch.allclose(decode(reply.eps_hat), before(batch.x_t, batch.t - 1, class_labels=batch.labels).sample, atol=1e-6)
    ack = _backward(s, "c0", batch, reply)  # a lone client's round closes on its own backward
    assert ack.applied and not ack.duplicate and ack.server_step == 1 and server.trainer.core.step == 1
    assert (ack.round, ack.round_clients, ack.round_images) == (reply.round, 1, 4)
    # The server's parameter gradients (left on its parameters by the optimizer step) against autograd.
    server_grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in server_grads)
    assert _relative(server_grads, _reference_grads(before, batch)) <= 1e-6
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))  # it stepped
    assert server.trainer.core.losses[-1][0] == 1


def test_a_round_of_several_clients_is_one_step_of_their_pooled_mean_loss(server: Any) -> None:
    """Clients of different batch sizes, forwards in one order and backwards in another: one optimizer step whose
    gradient is autograd's of mse over the concatenated batch (each client weighted by its images), at theta0."""
    s = stub(server)
    for k in range(3):
        _register(s, f"c{k}")
    engine = _engine(server)
    seen: dict[int, list[torch.Tensor]] = {}
    engine.observer = lambda number, grads: seen.__setitem__(number, [g.clone() for g in grads])
    theta0 = copy.deepcopy(server.trainer.core.model)
    batches = {f"c{k}": _batch(10 + k, n) for k, n in enumerate((2, 4, 6))}
    replies = {c: _forward(stub(server), c, batches[c]) for c in ("c1", "c0", "c2")}
    assert {r.server_step for r in replies.values()} == {0} and len({r.round for r in replies.values()}) == 1
    acks = _in_threads([lambda c=c: _backward(stub(server), c, batches[c], replies[c])  # type: ignore[misc]
                        for c in ("c2", "c0", "c1")], stagger=0.1)
    assert server.trainer.core.step == 1  # one step for the round, not one per client
    assert {(a.server_step, a.round_clients, a.round_images, a.applied) for a in acks} == {(1, 3, 12, True)}
    pooled = _concat([batches[c] for c in sorted(batches)])
    assert _relative(seen[replies["c0"].round], _reference_grads(theta0, pooled)) <= 1e-5
    # The next forwards see the stepped model: a new round.
    assert _forward(s, "c0", batches["c0"]).server_step == 1


def test_concurrent_clients_over_grpc(server: Any) -> None:
    clients = 4
    for k in range(clients):
        _register(stub(server), f"c{k}")
    engine = _engine(server)
    seen: list[list[torch.Tensor]] = []
    engine.observer = lambda number, grads: seen.append([g.clone() for g in grads])
    theta0 = copy.deepcopy(server.trainer.core.model)
    batches = [_batch(20 + k) for k in range(clients)]
    barrier = threading.Barrier(clients)

    def run(k: int) -> collafuse_pb2.SplitForwardReply:
        own = stub(server)
        reply = _forward(own, f"c{k}", batches[k])
        barrier.wait(timeout=30)  # every forward before any backward: one round
        _backward(own, f"c{k}", batches[k], reply)
        return reply

    replies = _in_threads([lambda k=k: run(k) for k in range(clients)])  # type: ignore[misc]
    assert server.trainer.core.step == 1 and len(seen) == 1
    assert all(r.server_step == 0 for r in replies)
    assert _relative(seen[0], _reference_grads(theta0, _concat(batches))) <= 1e-5


def _train_in_rounds(orders: Sequence[tuple[Sequence[int], Sequence[int]]], merge: bool) -> torch.nn.Module:
    """Three clients, one round per entry of ``orders``: (forward order, backward order); the final weights."""
    torch.manual_seed(0)
    core = TrainCore(build_unet("tiny", SHAPE, 3), TrainOptions(), torch.device("cpu"))
    engine = SplitEngine(core, max_steps=0, label_dropout=0.3, seed=5,
                         merger=ForwardMerger(64, 0.2) if merge else None)
    for number, (forwards, backwards) in enumerate(orders):
        batches = {k: _batch(300 + 10 * number + k, 2 + k) for k in range(3)}
        if merge:  # concurrent forwards: they ride in one model call
            results = dict(zip(forwards, _in_threads([
                lambda k=k, b=batches: engine.forward(f"c{k}", b[k].x_t, b[k].t, b[k].labels)  # type: ignore[misc]
                for k in forwards])))
        else:
            results = {k: engine.forward(f"c{k}", batches[k].x_t, batches[k].t, batches[k].labels) for k in forwards}

        _in_threads([lambda k=k, r=results, b=batches: _send_backward(engine, f"c{k}", r[k], b[k])  # type: ignore[misc]
                     for k in backwards], stagger=0.02)
    assert core.step == len(orders)
    return core.model


def _send_backward(engine: SplitEngine, client_id: str, forward: Any, batch: NoisedBatch) -> Any:
    rows, _ = loss_gradient(forward.eps_hat, batch.eps)
    return engine.backward(client_id, forward.step_id, rows / rows.shape[0])


def test_the_model_does_not_depend_on_arrival_order_or_merging() -> None:
    """Same seeds and data (label drop-out on): any order of forwards and backwards, merged or not, gives the
    same model up to float rounding."""
    a = _train_in_rounds([((0, 1, 2), (0, 1, 2)), ((0, 1, 2), (2, 1, 0)), ((1, 2, 0), (1, 0, 2))], merge=False)
    b = _train_in_rounds([((2, 1, 0), (1, 2, 0)), ((1, 0, 2), (0, 2, 1)), ((0, 2, 1), (2, 0, 1))], merge=False)
    merged = _train_in_rounds([((2, 0, 1), (0, 1, 2)), ((0, 1, 2), (1, 2, 0)), ((2, 1, 0), (0, 1, 2))], merge=True)
    start = build_unet("tiny", SHAPE, 3)
    params = [list(m.parameters()) for m in (a, b, merged)]
    assert all(torch.equal(x, y) for x, y in zip(params[0], params[1]))  # unmerged: bit for bit
    moved = _relative([x.detach() - s.detach() for x, s in zip(params[0], start.parameters())],
                      [y.detach() - s.detach() for y, s in zip(params[2], start.parameters())])
    assert moved <= 1e-3  # merged: the rounding of another batch composition only


# ---- rounds: bounds, deadlines, idempotency --------------------------------------------------------------


def _core() -> TrainCore:
    torch.manual_seed(0)
    return TrainCore(build_unet("tiny", SHAPE, 3), TrainOptions(), torch.device("cpu"))


def test_one_step_per_client_per_round_and_a_bounded_round() -> None:
    engine = SplitEngine(_core(), max_steps=0, limits=RoundLimits(max_clients=2, timeout=10.0))
    b = _batch(3)
    first = engine.forward("x", b.x_t, b.t, b.labels)
    with pytest.raises(RequestRefused) as twice:
        engine.forward("x", b.x_t, b.t, b.labels)
    assert twice.value.code == Code.RESOURCE_EXHAUSTED and "send that backward first" in twice.value.message
    assert twice.value.retry_after_s is not None and 0 < twice.value.retry_after_s <= 10.0
    engine.forward("y", b.x_t, b.t, b.labels)
    with pytest.raises(RequestRefused) as full:
        engine.forward("z", b.x_t, b.t, b.labels)
    assert full.value.code == Code.RESOURCE_EXHAUSTED and "--split-max-round-clients" in full.value.message
    assert engine.pending == 2 and first.round == 1


def test_a_vanished_client_cannot_stall_a_round_and_its_late_gradient_is_refused() -> None:
    now = [0.0]
    core = _core()
    engine = SplitEngine(core, max_steps=0, limits=RoundLimits(timeout=10.0), clock=lambda: now[0])
    a, b = _batch(4), _batch(5)
    fa = engine.forward("a", a.x_t, a.t, a.labels)
    fb = engine.forward("b", b.x_t, b.t, b.labels)  # b never sends its backward in time
    done = threading.Event()
    answer: list[Any] = []

    def backward_a() -> None:
        rows, _ = loss_gradient(fa.eps_hat, a.eps)
        answer.append(engine.backward("a", fa.step_id, rows / 4))
        done.set()

    thread = threading.Thread(target=backward_a)
    thread.start()
    assert not done.wait(0.5) and core.step == 0  # the round waits for b ...
    now[0] = 10.5  # ... until its deadline
    assert done.wait(10)
    thread.join()
    assert answer[0].applied and answer[0].clients == 1 and core.step == 1
    assert engine.counters.deadline_closes == 1 and engine.counters.dropped_steps == 1
    with pytest.raises(RequestRefused) as late:
        engine.backward("b", fb.step_id, torch.zeros_like(b.x_t))
    assert late.value.code == Code.FAILED_PRECONDITION and "run the forward again" in late.value.message
    assert engine.counters.late_gradients == 1
    # b is no longer awaited: a's next round closes on a's own backward.
    again = engine.forward("a", a.x_t, a.t, a.labels)
    rows, _ = loss_gradient(again.eps_hat, a.eps)
    assert engine.backward("a", again.step_id, rows / 4).applied and core.step == 2


def test_an_open_round_holds_the_ambient_trainer_until_it_closes_or_its_deadline() -> None:
    now = [0.0]
    core = _core()
    engine = SplitEngine(core, max_steps=0, limits=RoundLimits(timeout=10.0), clock=lambda: now[0])
    core.frozen = engine.frozen
    b = _batch(4)
    batches = lambda g: b
    loss = lambda net, batch, g: (net(batch.x_t, batch.t, batch.labels) - batch.eps).pow(2).mean()
    assert not engine.frozen() and not core.train_step(batches, loss).held
    engine.forward("gone", b.x_t, b.t, b.labels)  # a split client that never comes back
    held = core.train_step(batches, loss)
    assert engine.frozen() and held.held and core.step == 1  # nothing drawn, nothing stepped
    now[0] = 10.5  # its round's deadline: the weights are free again, though nobody closed the round yet
    assert not engine.frozen() and not core.train_step(batches, loss).held and core.step == 2


def test_rounds_of_clients_that_vanish_hold_no_memory() -> None:
    now = [0.0]
    engine = SplitEngine(_core(), max_steps=0, limits=RoundLimits(max_clients=4, timeout=1.0), clock=lambda: now[0])
    b = _batch(4)
    for number in range(50):  # clients that send forwards and never come back
        now[0] = number * 2.0
        for k in range(4):
            engine.forward(f"c{number}-{k}", b.x_t, b.t, b.labels)
        assert engine.pending <= 4
    assert engine.counters.empty_rounds == 49 and engine.counters.dropped_steps == 49 * 4
    assert len(engine._dropped) <= split_rounds.REMEMBERED_STEPS


def test_clients_stepping_concurrently_in_rounds() -> None:
    """Forwards and backwards of several clients interleaved freely (the sim's pattern): one step per round."""
    core = _core()
    engine = SplitEngine(core, max_steps=0, limits=RoundLimits(timeout=60.0))

    def client(k: int) -> None:
        for i in range(6):
            b = _batch(100 * k + i)
            result = engine.forward(f"c{k}", b.x_t, b.t, b.labels)
            rows, _ = loss_gradient(result.eps_hat, b.eps)
            engine.backward(f"c{k}", result.step_id, rows / rows.shape[0], last=i == 5)

    _in_threads([lambda k=k: client(k) for k in range(3)])  # type: ignore[misc]
    assert 6 <= core.step <= 18 and engine.pending == 0
    assert engine.counters.rounds == core.step and engine.counters.late_gradients == 0


def test_a_retried_backward_is_acknowledged_not_applied_twice(server: Any) -> None:
    s = stub(server)
    _register(s, "c0")
    batch = _batch(5)
    reply = _forward(s, "c0", batch)
    first = _backward(s, "c0", batch, reply)
    again = _backward(s, "c0", batch, reply)
    assert first.applied and not first.duplicate
    assert again.duplicate and again.server_step == first.server_step == 1 and server.trainer.core.step == 1


def test_a_retry_during_the_first_attempt_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    core = _core()
    engine = SplitEngine(core, max_steps=0)
    b = _batch(9)
    result = engine.forward("c", b.x_t, b.t, b.labels)
    grad = loss_gradient(result.eps_hat, b.eps)[0] / 4
    entered, release = threading.Event(), threading.Event()
    step_with_gradients = core.step_with_gradients

    def slow(grads: Sequence[torch.Tensor], loss: float | None = None) -> StepResult:
        entered.set()
        release.wait(30)
        return step_with_gradients(grads, loss)

    monkeypatch.setattr(core, "step_with_gradients", slow)
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(engine.backward("c", result.step_id, grad)))
    first.start()
    assert entered.wait(30)
    retry = threading.Thread(target=lambda: answers.append(engine.backward("c", result.step_id, grad)))
    retry.start()
    time.sleep(0.2)
    release.set()
    first.join(30)
    retry.join(30)
    assert sorted(a.duplicate for a in answers) == [False, True] and core.step == 1


def test_a_second_forward_before_the_backward_over_grpc(tmp_path: Path) -> None:
    srv = start(tmp_path / "store", start_trainer=False, split_round_timeout=20.0)
    try:
        s = stub(srv)
        _register(s, "c0")
        batch = _batch(6)
        _forward(s, "c0", batch)
        error = rpc_error(s.SplitForward, forward_request("c0", batch, CUT, FLOOR, ALPHAS))
        assert error.code() == Code.RESOURCE_EXHAUSTED and "send that backward first" in error.details()
        # The hint a client's RetryPolicy waits for: when the round closes at its deadline.
        hint_ms = int(dict(error.trailing_metadata() or ())[RETRY_AFTER_KEY])
        assert 0 < hint_ms <= 20_000
    finally:
        srv.stop(0)


# ---- validation -----------------------------------------------------------------------------------


def _raw_forward(client_id: str, x: torch.Tensor, t: list[int], labels: list[int]) -> collafuse_pb2.SplitForwardRequest:
    return collafuse_pb2.SplitForwardRequest(client_id=client_id, x_t=encode(x), t=t, labels=labels)


def test_the_server_validates_everything_it_receives(server: Any) -> None:
    s = stub(server)
    _register(s, "c0", classes=("a", "b"))
    _register(s, "amb", protocol=collafuse_pb2.PROTOCOL_AMBIENT)
    x = torch.zeros((2, *SHAPE))
    cases = [
        (_raw_forward("c0", x, [CUT, CUT + 1], [0, 0]), Code.INVALID_ARGUMENT, "outside"),  # t <= cut
        (_raw_forward("c0", x, [CUT + 1, T + 1], [0, 0]), Code.INVALID_ARGUMENT, "outside"),  # t > T
        (_raw_forward("c0", x, [CUT + 1], [0, 0]), Code.INVALID_ARGUMENT, "one each per image"),
        (_raw_forward("c0", torch.zeros((2, 1, 4, 4)), [CUT + 1] * 2, [0, 0]), Code.INVALID_ARGUMENT, "shape"),
        (_raw_forward("c0", x.half(), [CUT + 1] * 2, [0, 0]), Code.INVALID_ARGUMENT, "dtype"),
        (_raw_forward("c0", torch.full_like(x, float("nan")), [CUT + 1] * 2, [0, 0]), Code.INVALID_ARGUMENT, "NaN"),
        (_raw_forward("c0", torch.full_like(x, 1e3), [CUT + 1] * 2, [0, 0]), Code.INVALID_ARGUMENT, "range"),
        (_raw_forward("c0", x, [CUT + 1] * 2, [0, 2]), Code.INVALID_ARGUMENT, "not among the classes"),  # 'c'
        (_raw_forward("c0", x, [CUT + 1] * 2, [0, 9]), Code.INVALID_ARGUMENT, "not a served class"),
        (_raw_forward("c0", torch.zeros((0, *SHAPE)), [], []), Code.INVALID_ARGUMENT, "0 images"),
        (collafuse_pb2.SplitForwardRequest(client_id="c0", t=[CUT + 1], labels=[0]), Code.INVALID_ARGUMENT, "missing"),
        (_raw_forward("amb", x, [CUT + 1] * 2, [0, 0]), Code.FAILED_PRECONDITION, "protocol split"),
        (_raw_forward("nobody", x, [CUT + 1] * 2, [0, 0]), Code.FAILED_PRECONDITION, "not registered"),
    ]
    for request, code, words in cases:
        error = rpc_error(s.SplitForward, request)
        assert error.code() == code and words in error.details(), (request.t, error.details())
    assert _engine(server).pending == 0  # nothing refused was kept

    _register(s, "c1", classes=("a", "b"))
    reply = s.SplitForward(_raw_forward("c0", x, [CUT + 1] * 2, [0, 1]), timeout=10)

    def backward(client_id: str, grad: torch.Tensor, step_id: str = reply.step_id) -> grpc.RpcError:
        return rpc_error(s.SplitBackward,
                         collafuse_pb2.SplitBackwardRequest(client_id=client_id, step_id=step_id, grad=encode(grad)))

    assert backward("c1", x).code() == Code.PERMISSION_DENIED  # a step id belongs to its caller
    assert backward("c0", x, step_id="0" * 32).code() == Code.FAILED_PRECONDITION
    assert backward("c0", torch.zeros((3, *SHAPE))).code() == Code.INVALID_ARGUMENT
    assert backward("c0", torch.full_like(x, float("inf"))).code() == Code.INVALID_ARGUMENT
    absurd = backward("c0", torch.full_like(x, 3e38))  # finite, and enough to poison Adam's moments
    assert absurd.code() == Code.INVALID_ARGUMENT and "--split-max-grad-norm" in absurd.details()
    assert _engine(server).counters.refused_gradients == 1  # (Inf is refused by the tensor codec already)
    nan_loss = collafuse_pb2.SplitBackwardRequest(client_id="c0", step_id=reply.step_id, grad=encode(x), loss=math.nan)
    assert rpc_error(s.SplitBackward, nan_loss).code() == Code.INVALID_ARGUMENT
    ok = s.SplitBackward(collafuse_pb2.SplitBackwardRequest(client_id="c0", step_id=reply.step_id, grad=encode(x)), timeout=10)
    assert ok.applied  # the refusals above left the step pending for its owner


def test_a_finished_server_says_so_in_the_forward_reply(tmp_path: Path) -> None:
    srv = start(tmp_path / "store", start_trainer=False, max_steps=1, label_dropout=0.0)
    try:
        s = stub(srv)
        _register(s, "c0")
        batch = _batch(7)
        ack = _backward(s, "c0", batch, _forward(s, "c0", batch))
        assert ack.done and ack.max_steps == 1
        reply = _forward(s, "c0", batch)
        assert reply.done and not reply.step_id and reply.server_step == 1  # a status, not an error to parse
    finally:
        srv.stop(0)


# ---- the client's send guard ---------------------------------------------------------------------------


def test_the_guard_refuses_what_was_not_noised_above_the_cut() -> None:
    good = _batch(8)
    assert torch.equal(guard_outgoing(good, CUT, FLOOR, ALPHAS), good.x_t)
    with pytest.raises(UnsafeSend, match="only batches noised"):
        guard_outgoing(good.x0, CUT, FLOOR, ALPHAS)  # a raw image tensor
    forged = NoisedBatch(good.x_t, good.t, good.labels, good.x0, good.eps, good.digest)  # not made by noise_batch
    with pytest.raises(UnsafeSend, match="only batches noised"):
        guard_outgoing(forged, CUT, FLOOR, ALPHAS)
    low = dataclasses.replace(good, t=torch.full_like(good.t, CUT))
    with pytest.raises(UnsafeSend, match="<= cut"):
        guard_outgoing(low, CUT, FLOOR, ALPHAS)
    with pytest.raises(UnsafeSend, match="noise floor"):
        guard_outgoing(good, CUT, float(ALPHAS[T]) / 2, ALPHAS)
    swapped = dataclasses.replace(good, x_t=good.x0.clone())
    with pytest.raises(UnsafeSend, match="changed after"):
        guard_outgoing(swapped, CUT, FLOOR, ALPHAS)
    resealed = dataclasses.replace(good, x_t=good.x0.clone(), digest=client_split._digest(good.x0))
    with pytest.raises(UnsafeSend, match="not q_sample"):
        guard_outgoing(resealed, CUT, FLOOR, ALPHAS)
    with pytest.raises(UnsafeSend, match="t <= cut"):
        noise_batch(good.x0, torch.full_like(good.t, CUT), good.labels, good.eps, ALPHAS, CUT)


class FakeSplitConnection:
    """Answers split steps like a server that records what it received (eps_hat far from eps: large gradients)."""

    def __init__(self, max_steps: int = 0) -> None:
        self.forwards: list[collafuse_pb2.SplitForwardRequest] = []
        self.backwards: list[collafuse_pb2.SplitBackwardRequest] = []
        self.max_steps = max_steps

    def split_forward(self, request: collafuse_pb2.SplitForwardRequest) -> collafuse_pb2.SplitForwardReply:
        self.forwards.append(request)
        x_t = decode(request.x_t)
        return collafuse_pb2.SplitForwardReply(step_id=f"s{len(self.forwards)}", eps_hat=encode(x_t + 5.0),
                                               server_step=len(self.backwards))

    def split_backward(self, request: collafuse_pb2.SplitBackwardRequest) -> collafuse_pb2.SplitBackwardReply:
        self.backwards.append(request)
        step = len(self.backwards)
        return collafuse_pb2.SplitBackwardReply(server_step=step, max_steps=self.max_steps, applied=True,
                                                done=bool(self.max_steps) and step >= self.max_steps)


def _contribute(tmp_path: Path, connection: Any, options: SplitOptions, *, cut: int = CUT,
                schedule: ScheduleConfig = SCHEDULE, n: int = 16) -> client_split.SplitReport:
    images = torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with Ledger(tmp_path / "work") as ledger:
        return SplitClient(options).contribute(
            connection, ledger, client_id="c0", images=images, labels=[i % 3 for i in range(n)], paths=None, cut=cut,
            schedule=schedule, server="srv",
        )


def test_the_send_path_goes_through_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unnoised(x0: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, *_: Any) -> NoisedBatch:
        return NoisedBatch(x0, t, labels, x0, eps, client_split._digest(x0))  # a bug that skips the noise

    monkeypatch.setattr(client_split, "noise_batch", unnoised)
    fake = FakeSplitConnection()
    with pytest.raises(UnsafeSend):
        _contribute(tmp_path, fake, SplitOptions(batch_size=4, steps=2, max_image_exposure=math.inf))
    assert fake.forwards == []  # nothing left


def test_every_sent_t_is_above_the_cut(tmp_path: Path) -> None:
    fake = FakeSplitConnection()
    # No DP: each send gives the server its image, so only a lifted cap lets it go (the guard is what is tested).
    report = _contribute(tmp_path, fake, SplitOptions(batch_size=4, steps=5, max_image_exposure=math.inf))
    assert report.steps == 5 and report.stopped == "steps" and len(fake.forwards) == 5
    assert all(CUT < t <= T for request in fake.forwards for t in request.t)
    assert all(request.HasField("loss") for request in fake.backwards)  # without DP the loss is reported


# ---- differential privacy --------------------------------------------------------------------------------


def test_dp_clips_each_image_before_it_leaves(tmp_path: Path) -> None:
    clip, batch = 0.01, 4
    fake = FakeSplitConnection()
    _contribute(tmp_path / "dp", fake, SplitOptions(batch_size=batch, steps=3, dp_clip=clip, max_image_exposure=math.inf))
    norms = torch.cat([decode(r.grad).flatten(1).norm(dim=1) * batch for r in fake.backwards])
    assert norms.max() <= clip * (1 + 1e-5) and norms.min() > 0.5 * clip  # clipped, not zeroed
    assert not any(r.HasField("loss") for r in fake.backwards)  # with DP the loss stays on the client
    plain = FakeSplitConnection()
    _contribute(tmp_path / "plain", plain, SplitOptions(batch_size=batch, steps=3, max_image_exposure=math.inf))
    raw = torch.cat([decode(r.grad).flatten(1).norm(dim=1) * batch for r in plain.backwards])
    assert raw.min() > 10 * clip  # the control: without --dp-clip the rows are far larger
    noisy = FakeSplitConnection()
    _contribute(tmp_path / "noisy", noisy, SplitOptions(batch_size=batch, steps=1, dp_clip=clip, dp_noise_multiplier=1.0))
    rows = decode(noisy.backwards[0].grad) * batch
    assert rows.flatten(1).norm(dim=1).min() > 3 * clip  # sigma*C noise on each of the 64 elements


def test_the_client_stops_when_its_budget_is_spent(tmp_path: Path) -> None:
    """--dp-epsilon caps every image: each image's sends (x_t and gradient, at their t) compose to at most that
    epsilon, the client stops when no image may be sent any more, and a second run does not start over."""
    schedule = ScheduleConfig()  # T = 1000: at cut 900 x_t is noisy enough that a send costs little
    options = SplitOptions(batch_size=4, dp_clip=1.0, dp_noise_multiplier=2.0, dp_epsilon=3.0)
    fake = FakeSplitConnection()
    report = _contribute(tmp_path, fake, options, cut=900, schedule=schedule)
    assert report.stopped.startswith("privacy budget spent") and report.epsilon is not None
    assert 5 <= report.steps == len(fake.forwards) < 200
    assert report.epsilon <= 3.0
    assert fake.backwards[-1].last and not any(b.last for b in fake.backwards[:-1])  # it said when it was done
    again = FakeSplitConnection()  # the spend is in the ledger: a second run only draws on what is left of each cap
    second = _contribute(tmp_path, again, options, cut=900, schedule=schedule)
    assert second.epsilon is not None and report.epsilon <= second.epsilon <= 3.0
    with Ledger(tmp_path / "work") as ledger:
        privacy = PrivacyLedger(ledger.path)
        rows, sends, exposures = privacy.records(), privacy.sends(), privacy.exposures()
        privacy.close()
    assert len(rows) == report.steps + second.steps and all(r.status == "acked" for r in rows)
    assert rows[-1].epsilon == pytest.approx(second.epsilon)
    # The ledger's sends are what the server got (t by t), and every image stayed within its epsilon.
    assert sorted(t for _, _, t, _ in sends) == sorted(int(t) for r in fake.forwards + again.forwards for t in r.t)
    per_image: dict[str, float] = {}
    for _, key, _, mu2 in sends:
        per_image[key] = per_image.get(key, 0.0) + mu2
    assert max(per_image.values()) <= gaussian_mu(3.0, options.dp_delta) ** 2
    assert per_image == pytest.approx({k: e.mu2 for k, e in exposures.items() if e.sends})
    assert second.epsilon == pytest.approx(epsilon_of_mu2(max(per_image.values()), options.dp_delta))


def test_without_dp_noise_a_budget_allows_no_step(tmp_path: Path) -> None:
    """A client that may never send anything says so and stops (an error), rather than wait for a server it
    will never train."""
    fake = FakeSplitConnection()
    with pytest.raises(ClientError, match="without DP noise"):
        _contribute(tmp_path, fake, SplitOptions(batch_size=4, dp_epsilon=100.0))
    assert not fake.forwards
    default = FakeSplitConnection()  # the default exposure cap alone refuses it too
    with pytest.raises(ClientError, match="--split-max-image-exposure inf"):
        _contribute(tmp_path / "default", default, SplitOptions(batch_size=4))
    assert not default.forwards
    noised = FakeSplitConnection()  # nothing of the refusal sticks: with DP noise the same workdir sends
    assert _contribute(tmp_path / "default", noised, SplitOptions(batch_size=4, steps=2, dp_clip=0.1,
                                                                  dp_noise_multiplier=1.0)).steps == 2


def test_ambient_releases_are_reported_in_the_same_unit(tmp_path: Path) -> None:
    level = ReleaseLevel.of(SCHEDULE, CUT)
    with Ledger(tmp_path / "work") as ledger:
        ledger.record_sent([SentItem(f"k{i}", 0, i, "0" * 64) for i in range(3)], level, "ambient", "srv")
        report = privacy_report(ledger, 1e-5, SHAPE)
    (entry,) = report["ambient"]
    expected = release_epsilon(level.alpha_bar, 64, 1e-5)
    assert entry["releases"] == 3 and entry["cut"] == CUT
    assert entry["epsilon_per_release"] == pytest.approx(expected["epsilon_exact"])
    assert report["split"]["steps"] == 0 and report["split"]["epsilon"] == 0.0


def test_split_steps_and_the_ambient_trainer_share_the_model(tmp_path: Path) -> None:
    """An ambient client's releases train in the background while a split client steps the same model.
    (Uniform-noise images: the server's check of each step against its own objective, which such data
    cannot inform, is off here; tests/test_split_poisoning.py tests it on real digits.)"""
    srv = start(tmp_path / "store", max_steps=0, label_dropout=0.0, split_trust_window=0)
    try:
        s = stub(srv)
        s.Register(collafuse_pb2.RegisterRequest(client_id="amb", cut=CUT, protocol=collafuse_pb2.PROTOCOL_AMBIENT,
                                                 class_names=["a", "b", "c"]), timeout=10)
        upload(s, chunks("amb", CUT, 16, 8))
        deadline = time.monotonic() + 60
        while srv.trainer.core.step < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        _register(s, "c0")
        applied = 0
        for i in range(5):
            batch = _batch(200 + i)
            applied += _backward(s, "c0", batch, _forward(s, "c0", batch)).applied
        assert applied == 5 and srv.trainer.error is None
        steps = srv.trainer.core.step
        time.sleep(0.3)
        assert srv.trainer.core.step > steps  # the background trainer still runs
    finally:
        srv.stop(0)


# ---- the client lifecycle -----------------------------------------------------------------------------------


def test_protocol_split_through_the_client_lifecycle(tmp_path: Path) -> None:
    """A real server, a client run with --protocol split that may send each image once; outputs as for ambient."""
    # The server's check against its own objective is off: on these synthetic images a step may point against it and
    # be left out (server/gradient_trust.py, tested in tests/test_gradient_trust.py), and this test checks that the
    # client's steps train and checkpoint the server's model.
    srv = start(tmp_path / "store", classes=["0", "1", "2"], max_steps=100, checkpoint_every=1, batch_size=4,
                split_trust_window=0)
    try:
        make_image_folder(tmp_path / "data", classes=("0", "2"), per_class=4)
        settings = ClientSettings(
            data=tmp_path / "data", server=srv.address, workdir=tmp_path / "work", cut=CUT, protocol="split",
            train_steps=2, batch_size=4, inference_steps=5, samples_per_class=1, retries=2, rpc_timeout=10, seed=1,
            device="cpu", dp_clip=1.0, dp_noise_multiplier=1.0, dp_epsilon=1e4, split_max_sends_per_image=1,
            split_max_image_exposure=4.0, wait_for_server=False,
        )
        chosen = client_protocol("split", settings).options  # type: ignore[attr-defined]
        assert (chosen.dp_epsilon, chosen.max_sends_per_image, chosen.max_image_exposure) == (1e4, 1, 4.0)
        with ClientLifecycle(settings, poll_interval=0.01) as client:
            metrics = client.run()
            status = client.status()
        # 8 images, 4 a step, each sent once: two steps, and the client is done (it said so with the last one).
        contribution = metrics["contribution"]
        assert contribution["steps"] == 2 and contribution["stopped"].startswith("privacy budget spent")
        stored = json.loads((tmp_path / "work" / "metrics.json").read_text())
        split = stored["privacy"]["split"]
        assert split["steps"] == 2 and split["images_sent"] == 8 and split["max_sends_per_image"] == 1
        assert 0 < split["epsilon"] <= 1e4
        assert status["privacy"]["split"]["steps"] == 2
        assert (tmp_path / "work" / "samples" / "grid.png").is_file()
        assert srv.trainer.core.step == 2  # every step applied
        time.sleep(0.1)
        # The split steps checkpointed the server's model: a diffusers model folder.
        latest = tmp_path / "store" / "checkpoints" / "latest"
        assert load_model(next(p for p in latest.iterdir() if (p / "config.json").is_file())) is not None
    finally:
        srv.stop(0)


def test_split_is_refused_at_registration_under_data_parallel_training(tmp_path: Path) -> None:
    """A round's step runs on rank 0's RPC thread alone: under torchrun the replicas would drift, so the
    server does not speak split there, and says why."""
    srv = start(tmp_path / "store", start_trainer=False, data_parallel=2)
    try:
        error = rpc_error(stub(srv).Register, collafuse_pb2.RegisterRequest(
            client_id="c0", cut=CUT, protocol=collafuse_pb2.PROTOCOL_SPLIT, class_names=["a"]))
        assert error.code() == Code.INVALID_ARGUMENT and "data-parallel" in error.details()
        assert collafuse_pb2.PROTOCOL_SPLIT not in srv.servicer.protocols
        _register(stub(srv), "amb", protocol=collafuse_pb2.PROTOCOL_AMBIENT)  # ambient still served
    finally:
        srv.stop(0)
