"""Cross-client batching of split forward passes (server/protocols/split_merge.py): concurrent forwards of
different clients share one model call, each gets its own rows back unchanged, a lone client never waits,
and over gRPC a server that merges answers and trains exactly as one that does not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from server_support import SHAPE, T, start, stub
from test_observability import free_port, scrape, value

from collafuse.client.protocols.split import NoisedBatch, forward_request, loss_gradient, noise_batch
from collafuse.common.codec import decode, encode
from collafuse.common.models import build_unet
from collafuse.common.schedule import ScheduleConfig
from collafuse.server.protocols.split import SplitProtocol
from collafuse.server.protocols.split_merge import ForwardMerger
from collafuse.server.protocols.split_rounds import WeightStash
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
CUT = 20
ALPHAS = ScheduleConfig(num_train_timesteps=T).alphas_cumprod()
FLOOR = float(ALPHAS[CUT])
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
R = TypeVar("R")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def noised(seed: int, n: int) -> NoisedBatch:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    t = torch.randint(CUT + 1, T + 1, (n,), generator=g)
    return noise_batch(x0, t, torch.randint(0, 3, (n,), generator=g), torch.randn(x0.shape, generator=g), ALPHAS, CUT)


def rows(seed: int, n: int) -> Rows:
    batch = noised(seed, n)
    return batch.x_t, batch.t, batch.labels


def stash() -> WeightStash:
    torch.manual_seed(0)
    return WeightStash(build_unet("tiny", SHAPE, 3), 0)


def alone(weights: WeightStash, batch: Rows) -> torch.Tensor:
    with torch.no_grad():
        return weights.model(batch[0], batch[1] - 1, class_labels=batch[2]).sample.float()


def at_once(call: Callable[[str], R], keys: Iterable[str]) -> dict[str, R | Exception]:
    """``call(key)`` for every key in a thread of its own, released together by a barrier; what each returned
    or raised."""
    keys = list(keys)
    barrier = threading.Barrier(len(keys))
    out: dict[str, R | Exception] = {}

    def one(key: str) -> None:
        barrier.wait()
        try:
            out[key] = call(key)
        except Exception as exc:  # noqa: BLE001 -- the caller looks at it
            out[key] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return out


def concurrently(merger: ForwardMerger, weights: Any, batches: dict[str, Rows]) -> dict[str, torch.Tensor | Exception]:
    """Every client's forward at once."""
    return at_once(lambda c: merger.eps_hat(c, weights, *batches[c]), batches)


def warm_up(merger: ForwardMerger, weights: Any, batches: dict[str, Rows]) -> None:
    """One forward per client, one after another: the merger now counts them as active."""
    wait, merger.max_wait_s = merger.max_wait_s, 0.0
    for client_id, batch in batches.items():
        merger.eps_hat(client_id, weights, *batch)
    merger.max_wait_s = wait


def test_concurrent_forwards_share_one_call_and_get_their_own_rows() -> None:
    weights = stash()
    batches = {f"c{i}": rows(i, 2 + i) for i in range(4)}  # 2 + 3 + 4 + 5 = 14 images
    merger = ForwardMerger(max_batch=14, max_wait_s=10.0)  # full at 14: the group closes without waiting 10 s
    warm_up(merger, weights, batches)
    calls, began = merger.calls, time.monotonic()
    results = concurrently(merger, weights, batches)
    assert merger.calls - calls == 1 and merger.merged == 3, "four clients' forwards ran as one model call"
    assert time.monotonic() - began < 5
    for client_id, batch in batches.items():
        got = results[client_id]
        assert isinstance(got, torch.Tensor) and got.shape == (batch[0].shape[0], *SHAPE)
        torch.testing.assert_close(got, alone(weights, batch), rtol=1e-5, atol=1e-6)


def test_a_lone_client_never_waits() -> None:
    weights, merger = stash(), ForwardMerger(max_batch=256, max_wait_s=30.0)
    batch = rows(0, 3)
    began = time.monotonic()
    for _ in range(3):
        torch.testing.assert_close(merger.eps_hat("only", weights, *batch), alone(weights, batch))
    assert time.monotonic() - began < 10, "with nobody else active a forward does not wait for company"
    assert merger.calls == 3 and merger.merged == 0


def test_a_merged_batch_never_exceeds_max_batch() -> None:
    weights = stash()
    batches = {f"c{i}": rows(10 + i, 3) for i in range(3)}
    merger = ForwardMerger(max_batch=5, max_wait_s=0.3)  # two forwards of 3 do not fit in 5
    warm_up(merger, weights, batches)
    calls = merger.calls
    results = concurrently(merger, weights, batches)
    assert merger.calls - calls == 3 and merger.merged == 0
    for client_id, batch in batches.items():
        torch.testing.assert_close(results[client_id], alone(weights, batch), rtol=1e-5, atol=1e-6)


class Broken:
    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")


def test_a_failed_model_call_fails_every_member() -> None:
    batches = {f"c{i}": rows(i, 2) for i in range(3)}
    merger, broken = ForwardMerger(max_batch=6, max_wait_s=10.0), Broken()
    merger.max_wait_s = 0.0
    for client_id, batch in batches.items():  # active, each alone (and failing)
        with pytest.raises(RuntimeError):
            merger.eps_hat(client_id, broken, *batch)
    merger.max_wait_s = 10.0
    results = concurrently(merger, broken, batches)
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results.values()), results


# ---- over gRPC: a merging server answers and trains as a server that does not merge ---------------------


def forward_all(api: Any, batches: dict[str, NoisedBatch]) -> dict[str, collafuse_pb2.SplitForwardReply]:
    replies = at_once(lambda c: api.SplitForward(forward_request(c, batches[c], CUT, FLOOR, ALPHAS), timeout=60),
                      batches)
    failed = {c: r for c, r in replies.items() if isinstance(r, Exception)}
    assert not failed, failed
    return {c: r for c, r in replies.items() if not isinstance(r, Exception)}


def backward(api: Any, client_id: str, batch: NoisedBatch, reply: collafuse_pb2.SplitForwardReply) -> None:
    grad, loss = loss_gradient(decode(reply.eps_hat), batch.eps)
    ack = api.SplitBackward(collafuse_pb2.SplitBackwardRequest(
        client_id=client_id, step_id=reply.step_id, grad=encode(grad / grad.shape[0]), loss=loss), timeout=60)
    assert ack.applied


def run_server(root: Path, cross_client: bool) -> dict[str, Any]:
    metrics_port = free_port()
    server = start(root, start_trainer=False, label_dropout=0.0, max_steps=100, split_cross_client=cross_client,
                   split_max_batch=12, metrics_port=metrics_port)
    try:
        api = stub(server)
        clients = [f"c{i}" for i in range(3)]
        for client_id in clients:
            api.Register(collafuse_pb2.RegisterRequest(client_id=client_id, cut=CUT, protocol=collafuse_pb2.PROTOCOL_SPLIT,
                                                       class_names=["a", "b", "c"]), timeout=10)
        protocol = server.servicer.protocols[collafuse_pb2.PROTOCOL_SPLIT]
        assert isinstance(protocol, SplitProtocol)
        merger = protocol.engine.merger
        replies: list[dict[str, torch.Tensor]] = []
        for round_ in range(2):  # round 0 sequential (clients become active), round 1 all at once
            batches = {c: noised(100 * round_ + i, 4) for i, c in enumerate(clients)}
            if round_ == 0:
                if merger is not None:
                    merger.max_wait_s = 0.0  # one at a time: nobody to wait for
                answered = {c: forward_all(api, {c: b})[c] for c, b in batches.items()}
            else:
                if merger is not None:
                    merger.max_wait_s = 10.0  # the group closes when full (12 images), long before this
                answered = forward_all(api, batches)
            replies.append({c: decode(r.eps_hat) for c, r in answered.items()})
            # The backwards of a round are answered together, once its one step is applied.
            acks = at_once(lambda c, b=batches, a=answered: backward(api, c, b[c], a[c]), clients)  # type: ignore[misc]
            assert not [e for e in acks.values() if isinstance(e, Exception)], acks
        model = [p.detach().clone() for p in server.trainer.core.model.parameters()]
        exported = scrape(metrics_port)
        return {"replies": replies, "merged": merger.merged if merger else 0, "model": model,
                "step": server.trainer.core.step, "exported": {name: value(exported, f"collafuse_split_{name}_total")
                                                              for name in ("forwards", "forwards_merged",
                                                                           "forward_model_calls", "rounds",
                                                                           "late_gradients")}}
    finally:
        server.stop(0)


def test_merging_changes_no_clients_eps_hat_or_the_model_over_grpc(tmp_path: Path) -> None:
    merged, plain = run_server(tmp_path / "merged", True), run_server(tmp_path / "plain", False)
    assert merged["merged"] == 2, "round 1's three forwards ran as one model call"
    assert merged["exported"] == {"forwards": 6, "forwards_merged": 2, "forward_model_calls": 4, "rounds": 2,
                                  "late_gradients": 0}, "Prometheus"
    assert plain["merged"] == 0 and plain["exported"]["forwards"] == 0  # no merger, no merge counters
    assert plain["exported"]["rounds"] == 2
    for got_round, want_round in zip(merged["replies"], plain["replies"], strict=True):
        for client_id, want in want_round.items():
            torch.testing.assert_close(got_round[client_id], want, rtol=1e-5, atol=1e-6)
    assert merged["step"] == plain["step"] == 2  # one step per round
    for a, b in zip(merged["model"], plain["model"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
