"""The split protocol (DESIGN 1b): exact gradients over gRPC, pending-step bounds, validation, the client's
send guard, DP clipping before anything leaves, the privacy budget, and a lifecycle run with --protocol split."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from client_fake_server import make_image_folder
from server_support import SHAPE, T, chunks, rpc_error, start, stub, upload

from collafuse.client.dp import PrivacyAccountant, release_epsilon
from collafuse.client.ledger import Ledger, ReleaseLevel, SentItem
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.privacy_ledger import PrivacyLedger, RdpTotal, privacy_report
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
from collafuse.common.config import ClientSettings
from collafuse.common.models import build_unet, load_model
from collafuse.common.rpc import RETRY_AFTER_KEY
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.train_loop import StepResult, TrainCore, TrainOptions
from collafuse.server.errors import RequestRefused
from collafuse.server.protocols import split as server_split
from collafuse.server.protocols.split import SplitEngine, SplitLimits
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
    srv = start(tmp_path / "store", start_trainer=False, label_dropout=0.0, max_steps=100, split_step_ttl=30.0)
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
    protocol = server.servicer.protocols[collafuse_pb2.PROTOCOL_SPLIT]
    return protocol.engine(server.trainer.core, server.trainer.max_steps, server.servicer._after_split_step)


def _forward(s: Any, client_id: str, batch: NoisedBatch) -> collafuse_pb2.SplitForwardReply:
    return s.SplitForward(forward_request(client_id, batch, CUT, FLOOR, ALPHAS), timeout=30)


def _backward(s: Any, client_id: str, batch: NoisedBatch, reply: collafuse_pb2.SplitForwardReply) -> collafuse_pb2.SplitBackwardReply:
    rows, loss = loss_gradient(decode(reply.eps_hat), batch.eps)
    grad = rows / rows.shape[0]
    return s.SplitBackward(collafuse_pb2.SplitBackwardRequest(client_id=client_id, step_id=reply.step_id, grad=encode(grad),
                                                              loss=loss), timeout=30)


# ---- exactness ------------------------------------------------------------------------------------


def test_one_split_step_gives_the_in_process_gradient(server: Any) -> None:
    s = stub(server)
    _register(s, "c0")
    model = server.trainer.core.model
    before = copy.deepcopy(model)
    batch = _batch(1)
    reply = _forward(s, "c0", batch)
    with torch.no_grad():
        assert torch.allclose(decode(reply.eps_hat), before(batch.x_t, batch.t - 1, class_labels=batch.labels).sample, atol=1e-6)
    ack = _backward(s, "c0", batch, reply)
    assert ack.applied and not ack.duplicate and ack.server_step == 1 and server.trainer.core.step == 1
    # The server's parameter gradients (left on its parameters by the optimizer step) against autograd.
    server_grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in server_grads)
    assert _relative(server_grads, _reference_grads(before, batch)) <= 1e-6
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))  # it stepped
    assert server.trainer.core.losses[-1][0] == 1


def test_several_clients_in_flight_get_exact_gradients_at_the_weights_they_saw(server: Any) -> None:
    """Forwards of several clients, backwards in another order, with optimizer steps in between."""
    s = stub(server)
    for k in range(3):
        _register(s, f"c{k}")
    engine = _engine(server)
    seen: dict[str, list[torch.Tensor]] = {}
    engine.observer = lambda step_id, grads: seen.__setitem__(step_id, [g.clone() for g in grads])
    theta0 = copy.deepcopy(server.trainer.core.model)
    a, b = _batch(10), _batch(11)
    ra, rb = _forward(s, "c0", a), _forward(s, "c1", b)
    _backward(s, "c0", a, ra)  # the model moves to version 1
    theta1 = copy.deepcopy(server.trainer.core.model)
    c = _batch(12)
    rc = _forward(s, "c2", c)
    assert (ra.server_step, rb.server_step, rc.server_step) == (0, 0, 1)
    _backward(s, "c2", c, rc)
    _backward(s, "c1", b, rb)  # two optimizer steps after its forward: still exact at theta0
    assert _relative(seen[ra.step_id], _reference_grads(theta0, a)) <= 1e-6
    assert _relative(seen[rb.step_id], _reference_grads(theta0, b)) <= 1e-6
    assert _relative(seen[rc.step_id], _reference_grads(theta1, c)) <= 1e-6
    assert server.trainer.core.step == 3 and engine.pending == 0 and engine.stashes == 0


def test_concurrent_clients_over_grpc(server: Any) -> None:
    clients = 4
    s = stub(server)
    for k in range(clients):
        _register(s, f"c{k}")
    engine = _engine(server)
    seen: dict[str, list[torch.Tensor]] = {}
    lock = threading.Lock()

    def observe(step_id: str, grads: list[torch.Tensor]) -> None:
        with lock:
            seen[step_id] = [g.clone() for g in grads]

    engine.observer = observe
    theta0 = copy.deepcopy(server.trainer.core.model)
    batches = [_batch(20 + k) for k in range(clients)]
    replies: dict[int, collafuse_pb2.SplitForwardReply] = {}
    barrier = threading.Barrier(clients)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            own = stub(server)
            replies[k] = _forward(own, f"c{k}", batches[k])
            barrier.wait(timeout=30)  # every forward before any backward: all saw theta0
            _backward(own, f"c{k}", batches[k], replies[k])
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert server.trainer.core.step == clients
    for k in range(clients):
        assert replies[k].server_step == 0
        assert _relative(seen[replies[k].step_id], _reference_grads(theta0, batches[k])) <= 1e-6


# ---- pending steps: bounds, expiry, idempotency ---------------------------------------------------------


def _core() -> TrainCore:
    torch.manual_seed(0)
    return TrainCore(build_unet("tiny", SHAPE, 3), TrainOptions(), torch.device("cpu"))


def test_pending_steps_are_bounded_and_expire() -> None:
    now = [0.0]
    engine = SplitEngine(_core(), max_steps=0, limits=SplitLimits(max_pending=3, per_client=2, ttl=10.0),
                         clock=lambda: now[0])
    b = _batch(3)
    engine.forward("x", b.x_t, b.t, b.labels)
    engine.forward("x", b.x_t, b.t, b.labels)
    with pytest.raises(RequestRefused) as per_client:
        engine.forward("x", b.x_t, b.t, b.labels)
    assert per_client.value.code == Code.RESOURCE_EXHAUSTED
    # Only x's own steps free x's slots: come back when the oldest expires (ttl 10 s, made at t = 0).
    assert per_client.value.retry_after_s == pytest.approx(10.05)
    kept = engine.forward("y", b.x_t, b.t, b.labels)
    with pytest.raises(RequestRefused) as full:
        engine.forward("z", b.x_t, b.t, b.labels)
    assert full.value.code == Code.RESOURCE_EXHAUSTED and "pending" in full.value.message
    assert full.value.retry_after_s == server_split.BUSY_RETRY_S  # any backward frees a slot
    assert engine.pending == 3 and engine.stashes == 1  # one weight copy shared by the three steps
    now[0] = 11.0  # every client vanished between the halves
    assert engine.sweep() == 3 and engine.pending == 0 and engine.stashes == 0
    with pytest.raises(RequestRefused) as gone:
        engine.backward("y", kept.step_id, torch.zeros_like(b.x_t))
    assert gone.value.code == Code.FAILED_PRECONDITION and "expired" in gone.value.message
    engine.forward("z", b.x_t, b.t, b.labels)  # room again
    assert engine.expired == 3


def test_memory_stays_bounded_when_clients_vanish() -> None:
    now = [0.0]
    engine = SplitEngine(_core(), max_steps=0, limits=SplitLimits(max_pending=4, per_client=4, ttl=1.0),
                         clock=lambda: now[0])
    b = _batch(4)
    for round_ in range(50):  # clients that send forwards and never come back
        now[0] = round_ * 2.0
        for _ in range(4):
            engine.forward(f"c{round_}", b.x_t, b.t, b.labels)
        assert engine.pending <= 4 and engine.stashes <= 1


def test_clients_stepping_concurrently_never_share_a_recycled_weight_copy() -> None:
    """Forwards and backwards of several clients interleaved freely (the sim's pattern): a weight copy is
    recycled for a new version only once no step and no gradient computation uses it."""
    core = _core()
    engine = SplitEngine(core, max_steps=0, limits=SplitLimits(max_pending=16, per_client=2, ttl=60.0))
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for i in range(6):
                b = _batch(100 * k + i)
                result = engine.forward(f"c{k}", b.x_t, b.t, b.labels)
                rows, _ = loss_gradient(result.eps_hat, b.eps)
                engine.backward(f"c{k}", result.step_id, rows / rows.shape[0])
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert core.step == 18 and engine.pending == 0 and engine.stashes == 0


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


def test_pending_table_full_over_grpc(tmp_path: Path) -> None:
    srv = start(tmp_path / "store", start_trainer=False, split_max_pending=8, split_pending_per_client=2)
    try:
        s = stub(srv)
        _register(s, "c0")
        batch = _batch(6)
        _forward(s, "c0", batch)
        _forward(s, "c0", batch)
        error = rpc_error(s.SplitForward, forward_request("c0", batch, CUT, FLOOR, ALPHAS))
        assert error.code() == Code.RESOURCE_EXHAUSTED and "waiting for their backward" in error.details()
        # The hint a client's RetryPolicy waits for: when c0's oldest step expires (default ttl).
        hint_ms = int(dict(error.trailing_metadata() or ())[RETRY_AFTER_KEY])
        assert 0 < hint_ms <= srv.settings.split_step_ttl * 1000 + 100
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
    nan_loss = collafuse_pb2.SplitBackwardRequest(client_id="c0", step_id=reply.step_id, grad=encode(x), loss=math.nan)
    assert rpc_error(s.SplitBackward, nan_loss).code() == Code.INVALID_ARGUMENT
    ok = s.SplitBackward(collafuse_pb2.SplitBackwardRequest(client_id="c0", step_id=reply.step_id, grad=encode(x)), timeout=10)
    assert ok.applied  # the refusals above left the step pending for its owner


def test_a_finished_server_refuses_new_steps(tmp_path: Path) -> None:
    srv = start(tmp_path / "store", start_trainer=False, max_steps=1, label_dropout=0.0)
    try:
        s = stub(srv)
        _register(s, "c0")
        batch = _batch(7)
        ack = _backward(s, "c0", batch, _forward(s, "c0", batch))
        assert ack.done and ack.max_steps == 1
        error = rpc_error(s.SplitForward, forward_request("c0", batch, CUT, FLOOR, ALPHAS))
        assert error.code() == Code.FAILED_PRECONDITION and "finished training" in error.details()
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
        _contribute(tmp_path, fake, SplitOptions(batch_size=4, steps=2))
    assert fake.forwards == []  # nothing left


def test_every_sent_t_is_above_the_cut(tmp_path: Path) -> None:
    fake = FakeSplitConnection()
    report = _contribute(tmp_path, fake, SplitOptions(batch_size=4, steps=5))
    assert report.steps == 5 and report.stopped == "steps" and len(fake.forwards) == 5
    assert all(CUT < t <= T for request in fake.forwards for t in request.t)
    assert all(request.HasField("loss") for request in fake.backwards)  # without DP the loss is reported


# ---- differential privacy --------------------------------------------------------------------------------


def test_dp_clips_each_image_before_it_leaves(tmp_path: Path) -> None:
    clip, batch = 0.01, 4
    fake = FakeSplitConnection()
    _contribute(tmp_path / "dp", fake, SplitOptions(batch_size=batch, steps=3, dp_clip=clip))
    norms = torch.cat([decode(r.grad).flatten(1).norm(dim=1) * batch for r in fake.backwards])
    assert norms.max() <= clip * (1 + 1e-5) and norms.min() > 0.5 * clip  # clipped, not zeroed
    assert not any(r.HasField("loss") for r in fake.backwards)  # with DP the loss stays on the client
    plain = FakeSplitConnection()
    _contribute(tmp_path / "plain", plain, SplitOptions(batch_size=batch, steps=3))
    raw = torch.cat([decode(r.grad).flatten(1).norm(dim=1) * batch for r in plain.backwards])
    assert raw.min() > 10 * clip  # the control: without --dp-clip the rows are far larger
    noisy = FakeSplitConnection()
    _contribute(tmp_path / "noisy", noisy, SplitOptions(batch_size=batch, steps=1, dp_clip=clip, dp_noise_multiplier=1.0))
    rows = decode(noisy.backwards[0].grad) * batch
    assert rows.flatten(1).norm(dim=1).min() > 3 * clip  # sigma*C noise on each of the 64 elements


def test_the_client_stops_when_its_budget_is_spent(tmp_path: Path) -> None:
    schedule = ScheduleConfig()  # T = 1000: at cut 900 x_t is noisy enough that a step costs little
    options = SplitOptions(batch_size=4, dp_clip=1.0, dp_noise_multiplier=2.0, dp_epsilon=3.0)
    multiplier = SplitClient(options).noise_multiplier(schedule, 900, SHAPE)
    total, expected = RdpTotal(), 0
    assert options.dp_epsilon is not None
    while total.epsilon_if(options.dp_delta, multiplier, 4 / 16) <= options.dp_epsilon:
        total.add(multiplier, 4 / 16)
        expected += 1
    assert 1 <= expected < 50
    fake = FakeSplitConnection()
    report = _contribute(tmp_path, fake, options, cut=900, schedule=schedule)
    assert report.steps == expected == len(fake.forwards)
    assert report.stopped.startswith("privacy budget spent") and report.epsilon is not None
    assert report.epsilon <= options.dp_epsilon
    again = FakeSplitConnection()  # the spend is in the ledger: a second run may not start over
    assert _contribute(tmp_path, again, options, cut=900, schedule=schedule).steps == 0 and not again.forwards
    with Ledger(tmp_path / "work") as ledger:
        privacy = PrivacyLedger(ledger.path)
        rows = privacy.records()
        privacy.close()
    assert len(rows) == expected and all(r.status == "acked" for r in rows)
    assert rows[-1].epsilon == pytest.approx(report.epsilon)


def test_without_dp_noise_a_budget_allows_no_step(tmp_path: Path) -> None:
    fake = FakeSplitConnection()
    report = _contribute(tmp_path, fake, SplitOptions(batch_size=4, dp_epsilon=100.0))
    assert report.steps == 0 and not fake.forwards and "without DP noise" in report.stopped


def test_the_running_accountant_matches_the_dp_accountant() -> None:
    total, accountant = RdpTotal(), PrivacyAccountant()
    for s, q, n in ((1.5, 0.1, 7), (0.9, 0.25, 3), (1.5, 0.1, 2)):
        total.add(s, q, n)
        accountant.step(s, q, n)
    assert total.epsilon(1e-5) == pytest.approx(accountant.epsilon(1e-5), rel=1e-9)


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
    """An ambient client's releases train in the background while a split client steps the same model."""
    srv = start(tmp_path / "store", max_steps=0, label_dropout=0.0)
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
    """A real server, a client run with --protocol split and a budget of two steps; outputs as for ambient."""
    srv = start(tmp_path / "store", classes=["0", "1", "2"], max_steps=100, checkpoint_every=1, batch_size=4)
    try:
        make_image_folder(tmp_path / "data", classes=("0", "2"), per_class=4)
        base = SplitOptions(batch_size=4, dp_clip=1.0, dp_noise_multiplier=1.0)
        multiplier = SplitClient(base).noise_multiplier(SCHEDULE, CUT, SHAPE)
        total = RdpTotal()
        total.add(multiplier, 4 / 8, 2)
        budget = total.epsilon(1e-5) * (1 + 1e-9)  # exactly two steps
        settings = ClientSettings(
            data=tmp_path / "data", server=srv.address, workdir=tmp_path / "work", cut=CUT, protocol="split",
            train_steps=2, batch_size=4, inference_steps=5, samples_per_class=1, retries=2, rpc_timeout=10, seed=1,
            device="cpu", dp_clip=1.0, dp_noise_multiplier=1.0, dp_epsilon=budget, wait_for_server=False,
        )
        assert client_protocol("split", settings).options.dp_epsilon == budget  # type: ignore[attr-defined]
        with ClientLifecycle(settings, poll_interval=0.01) as client:
            metrics = client.run()
            status = client.status()
        assert metrics["release"]["steps"] == 2 and metrics["release"]["stopped"].startswith("privacy budget spent")
        stored = json.loads((tmp_path / "work" / "metrics.json").read_text())
        assert stored["privacy"]["split"]["steps"] == 2 and stored["privacy"]["split"]["epsilon"] <= budget
        assert status["privacy"]["split"]["steps"] == 2
        assert (tmp_path / "work" / "samples" / "grid.png").is_file()
        assert srv.trainer.core.step == 2
        time.sleep(0.1)
        # The split steps checkpointed the server's model: a diffusers model folder.
        latest = tmp_path / "store" / "checkpoints" / "latest"
        assert load_model(next(p for p in latest.iterdir() if (p / "config.json").is_file())) is not None
    finally:
        srv.stop(0)
