"""Identity (issue 15, item 7): an unknown client id costs what a known one costs, and failed authentication is
limited per peer (RESOURCE_EXHAUSTED with a retry hint). Both are measured, at the token table and over gRPC."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from server_support import rpc_error, start, stub

from collafuse.common.rpc import retry_after
from collafuse.server import auth
from collafuse.server.auth import FailureLimiter, TokenTable, add_token, peer_address
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
FACTOR = 2.0  # an unknown id's refusal takes within this factor of a known id's


def median_seconds(fn: Callable[[], object], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ratio(a: float, b: float) -> float:
    return max(a, b) / min(a, b)


@pytest.mark.parametrize("schemes", [("scrypt", "scrypt"), ("sha256", "scrypt")], ids=["scrypt", "mixed"])
def test_an_unknown_id_costs_what_a_known_one_costs(tmp_path: Path, schemes: tuple[str, str]) -> None:
    for who, scheme in zip(("alice", "bob"), schemes):
        add_token(tmp_path / "tokens", who, scheme=scheme)
    table = TokenTable.load(tmp_path / "tokens")
    guesses = {"alice": "alice.wrong-secret", "bob": "bob.wrong-secret", "unknown": "mallory.wrong-secret",
               "malformed": "no-dot-at-all"}
    cost = {name: median_seconds(lambda g=guess: table.identify(g)) for name, guess in guesses.items()}  # type: ignore[misc]
    assert all(table.identify(g) is None for g in guesses.values())
    slowest, fastest = max(cost.values()), min(cost.values())
    assert slowest / fastest < FACTOR, {k: f"{v * 1000:.2f} ms" for k, v in cost.items()}
    assert fastest > 0.005  # every refusal paid for a scrypt hash (tens of ms), not a table lookup


def test_over_grpc_a_refusal_does_not_tell_which_ids_exist(tmp_path: Path) -> None:
    add_token(tmp_path / "tokens", "alice", scheme="scrypt")
    running = start(tmp_path / "store", start_trainer=False, tokens=tmp_path / "tokens")
    try:
        known, unknown = stub(running, token="alice.wrong-secret"), stub(running, token="mallory.wrong-secret")

        def refused(api: object) -> Callable[[], object]:
            def call() -> object:
                err = rpc_error(api.Status, collafuse_pb2.StatusRequest())  # type: ignore[attr-defined]
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                return err

            return call

        refused(known)(), refused(unknown)()  # warm both channels up
        cost_known, cost_unknown = median_seconds(refused(known), 5), median_seconds(refused(unknown), 5)
        assert ratio(cost_known, cost_unknown) < FACTOR, (cost_known, cost_unknown)
    finally:
        running.stop(0)


def test_failed_authentication_is_rate_limited_per_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "AUTH_FAILURE_BURST", 5)
    monkeypatch.setattr(auth, "AUTH_FAILURE_REFILL_S", 60.0)
    tokens = {who: add_token(tmp_path / "tokens", who) for who in ("alice", "bob")}
    running = start(tmp_path / "store", start_trainer=False, tokens=tmp_path / "tokens")
    status = collafuse_pb2.StatusRequest()
    try:
        alice = stub(running, token=tokens["alice"])
        alice.Status(status, timeout=10)  # verified once, before anything failed
        guesser = stub(running, token="bob.guess")
        for _ in range(5):
            assert rpc_error(guesser.Status, status).code() == grpc.StatusCode.UNAUTHENTICATED
        limited = rpc_error(guesser.Status, status)
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, limited.details()
        assert "too many failed authentications" in limited.details()
        hint = retry_after(limited)
        assert hint is not None and 50 <= hint <= 60
        # While limited, no token from this peer is checked - bob's real one neither (it was never verified) ...
        assert rpc_error(stub(running, token=tokens["bob"]).Status, status).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ... but a token verified before costs nothing to check and is not slowed.
        assert alice.Status(status, timeout=10).server_id
        # A streaming call is refused the same way, its payload never parsed.
        register = collafuse_pb2.RegisterRequest(client_id="bob", cut=20, class_names=["a"])
        assert rpc_error(guesser.Register, register).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bob" not in {c.client_id for c in running.store.clients()}
    finally:
        running.stop(0)


def test_the_limiter_counts_per_peer_and_refills() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=3, refill_s=10.0, max_peers=2, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.wait("ipv4:10.0.0.1") == 0
        limiter.fail("ipv4:10.0.0.1")
    assert limiter.wait("ipv4:10.0.0.1") == pytest.approx(10.0)
    assert limiter.wait("ipv4:10.0.0.2") == 0  # another peer has its own allowance
    now[0] = 4.0
    assert limiter.wait("ipv4:10.0.0.1") == pytest.approx(6.0)
    now[0] = 10.0
    assert limiter.wait("ipv4:10.0.0.1") == 0  # one more attempt every refill interval
    limiter.fail("ipv4:10.0.0.1")
    assert limiter.wait("ipv4:10.0.0.1") == pytest.approx(10.0)
    assert peer_address("ipv4:10.0.0.1:53122") == "ipv4:10.0.0.1"
    assert peer_address("ipv6:[::1]:53122") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"
