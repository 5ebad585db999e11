"""Property-based fuzzing of every RPC against an in-process server on loopback.

Each example is one call, sent over a raw channel (pre-serialized bytes, so undecodable
messages get through): structured requests with at least one injected defect, raw bytes
that cannot parse, Release streams whose bad message follows re-sends of stored chunks,
and well-formed read-only calls. The oracle, per example:

* a *malformed* request (every mutating or sampling call here is malformed by
  construction, and every raw message is undecodable by construction) gets a non-OK
  status from REJECTIONS, never OK, UNKNOWN, INTERNAL (a crash), DEADLINE_EXCEEDED (a
  hang) or UNAVAILABLE;
* a *valid* request gets OK: Status (always), Heartbeat with an id within the limits
  (liveness is answered for anyone), Forget of an id never registered (removes nothing),
  an empty Release stream (stores nothing);
* every answer arrives within the call's deadline.

After all examples the server still answers, and hashes of the model weights (with the
EMA copy) and of the store's tables (minus ``last_seen``, which Heartbeat is meant to
move) are unchanged. The short run is in the default suite; ``make test-fuzz`` runs the
long one (>= 1,000 examples).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import CLASSES, SHAPE, T, chunks, register, start, stub, upload

from collafuse.common.codec import encode
from collafuse.common.rpc import open_channel
from collafuse.server.app import CollaFuseServer
from collafuse.server.limits import MAX_CLASSES, MAX_ID_CHARS, MAX_KEY_CHARS
from collafuse.v1 import collafuse_pb2, tensor_pb2

torch.set_num_threads(1)

SERVICE = "/collafuse.v1.CollaFuse/"
CLIENT = "fuzz-ok"  # the one registered client; its releases are the "stored" chunks below
CUT = 20
DEADLINE_S = 10.0
REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
}
STREAM_REQUEST = {"Release"}
STREAM_RESPONSE = {"Sample"}
NULL_LABEL = len(CLASSES)


@dataclass(frozen=True)
class Case:
    method: str
    messages: tuple[bytes, ...]  # one for unary requests; any number for the Release stream
    valid: bool
    kind: str


# ---- building blocks --------------------------------------------------------------------------------

ids = st.text(max_size=40).filter(lambda s: s.strip() != "" and s != CLIENT)
over_limit_ids = st.integers(MAX_ID_CHARS + 1, 4 * MAX_ID_CHARS).map(lambda n: "i" * n)
blank_ids = st.sampled_from(["", " ", "\t\n"])
bad_cuts = st.one_of(st.integers(-(2**31), -1), st.integers(T + 1, 2**31 - 1))
bad_labels = st.one_of(st.integers(-(2**31), -1), st.integers(NULL_LABEL + 1, 2**31 - 1))
# An 11-byte varint and wire type 7 are invalid in any message. Field number 0, and field 1 with bad
# UTF-8, are invalid in messages with a string field 1: every request but the empty StatusRequest,
# whose parser skips them as unknown fields.
ANY_MESSAGE_UNDECODABLE = (b"\xff" * 11, b"\x07")
UNDECODABLE_PREFIXES = (*ANY_MESSAGE_UNDECODABLE, b"\x00", b"\x0a\x02\xff\xfe")


def _tensor(draw: st.DrawFn, valid: bool) -> tensor_pb2.Tensor:
    if valid:
        return encode(torch.randn(SHAPE, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))))
    defect = draw(st.sampled_from(["dtype", "shape", "bytes", "nan", "range", "overflow", "negative", "rank"]))
    n = math.prod(SHAPE)
    good = np.zeros(n, "<f4")
    if defect == "dtype":
        return tensor_pb2.Tensor(dtype=draw(st.sampled_from(["float64", "int64", "complex", ""])), shape=SHAPE,
                                 data=good.tobytes())
    if defect == "shape":
        dims = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5).filter(lambda d: tuple(d) != SHAPE))
        return tensor_pb2.Tensor(dtype="float32", shape=dims, data=np.zeros(math.prod(dims), "<f4").tobytes())
    if defect == "bytes":
        size = draw(st.integers(0, 8 * n).filter(lambda s: s != 4 * n))
        return tensor_pb2.Tensor(dtype="float32", shape=SHAPE, data=draw(st.binary(min_size=size, max_size=size)))
    if defect in ("nan", "range"):
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf])) if defect == "nan" else draw(
            st.one_of(st.floats(51, 1e30), st.floats(-1e30, -51)))
        good[draw(st.integers(0, n - 1))] = value
        return tensor_pb2.Tensor(dtype="float32", shape=SHAPE, data=good.tobytes())
    if defect == "overflow":
        return tensor_pb2.Tensor(dtype="float32", shape=[2**62 + 1, 1, 8, 8], data=b"\0" * 256)
    if defect == "negative":
        return tensor_pb2.Tensor(dtype="float32", shape=[-1, 8, 8], data=good.tobytes())
    return tensor_pb2.Tensor(dtype="float32", shape=[1] * 20, data=b"\0" * 4)


@st.composite
def bad_release_chunk(draw: st.DrawFn) -> collafuse_pb2.ReleaseChunk:
    """A chunk with at least one defect; keys never collide with stored ones ("stored-...")."""
    n = draw(st.integers(1, 4))
    bad_item = draw(st.integers(0, n - 1))
    chunk_defect = draw(st.sampled_from(["none", "unknown client", "blank client", "long client", "cut"]))
    item_defect = "none" if chunk_defect != "none" else draw(
        st.sampled_from(["empty key", "long key", "label", "no tensor", "tensor"]))
    # An empty id is fine after a stream's first chunk (it means "the same client"); whitespace never is.
    whitespace = draw(blank_ids.filter(bool))
    client = {"unknown client": draw(ids), "blank client": whitespace, "long client": draw(over_limit_ids)}.get(
        chunk_defect, CLIENT)
    cut = draw(bad_cuts | st.sampled_from([0, 1, T, CUT + 1])) if chunk_defect == "cut" else CUT
    chunk = collafuse_pb2.ReleaseChunk(client_id=client, cut=cut)
    for i in range(n):
        broken = i == bad_item
        key = "fuzz-" + draw(st.text(min_size=1, max_size=20))
        if broken and item_defect == "empty key":
            key = ""
        elif broken and item_defect == "long key":
            key = "k" * draw(st.integers(MAX_KEY_CHARS + 1, 3 * MAX_KEY_CHARS))
        label = draw(bad_labels) if broken and item_defect == "label" else draw(st.integers(0, NULL_LABEL - 1))
        item = collafuse_pb2.ReleaseItem(image_key=key, label=label)
        if not (broken and item_defect == "no tensor"):
            item.x_cut.CopyFrom(_tensor(draw, valid=not (broken and item_defect == "tensor")))
        chunk.items.append(item)
    return chunk


@st.composite
def bad_register(draw: st.DrawFn) -> collafuse_pb2.RegisterRequest:
    request = collafuse_pb2.RegisterRequest(
        client_id=draw(ids), cut=draw(st.integers(0, T)), protocol=collafuse_pb2.PROTOCOL_AMBIENT,
        class_names=draw(st.lists(st.sampled_from(CLASSES), max_size=3, unique=True)),
    )
    defect = draw(st.sampled_from(["blank id", "long id", "cut", "protocol", "class", "many classes", "long class",
                                   "spec", "fingerprint"]))
    if defect == "blank id":
        request.client_id = draw(blank_ids)
    elif defect == "long id":
        request.client_id = draw(over_limit_ids)
    elif defect == "cut":
        request.cut = draw(bad_cuts)
    elif defect == "protocol":
        known = set(collafuse_pb2.Protocol.values())
        # proto3 enums are open: the field holds any int32, and unknown (or unspecified) values are the defect.
        request.protocol = cast(collafuse_pb2.Protocol, draw(st.integers(0, 2**31 - 1).filter(lambda p: p == 0 or p not in known)))
    elif defect == "class":
        request.class_names.append("not-served-" + draw(st.text(max_size=20)))
    elif defect == "many classes":
        request.class_names[:] = ["a"] * draw(st.integers(MAX_CLASSES + 1, 2 * MAX_CLASSES))
    elif defect == "long class":
        request.class_names.append("c" * draw(st.integers(200, 10_240)))
    elif defect == "spec":
        spec = draw(st.tuples(st.integers(1, 4), st.integers(1, 64), st.integers(1, 64)).filter(lambda s: s != SHAPE))
        request.image_spec.CopyFrom(collafuse_pb2.ImageSpec(channels=spec[0], height=spec[1], width=spec[2]))
    else:
        request.expected_fingerprint = "x" + draw(st.text(max_size=60))
    return request


@st.composite
def bad_sample(draw: st.DrawFn) -> collafuse_pb2.SampleRequest:
    request = collafuse_pb2.SampleRequest(
        client_id=CLIENT, labels=draw(st.lists(st.integers(0, NULL_LABEL), min_size=1, max_size=4)),
        seed=draw(st.integers(0, 2**64 - 1)), num_inference_steps=draw(st.integers(1, T)),
        scheduler=draw(st.sampled_from(["ddpm", "ddim"])), guidance_scale=1.0, cut=CUT,
    )
    defect = draw(st.sampled_from(["unknown client", "blank client", "long client", "no labels", "label",
                                   "too many", "cut", "steps", "scheduler", "guidance"]))
    if defect == "unknown client":
        request.client_id = draw(ids)
    elif defect == "blank client":
        request.client_id = draw(blank_ids)
    elif defect == "long client":
        request.client_id = draw(over_limit_ids)
    elif defect == "no labels":
        del request.labels[:]
    elif defect == "label":
        request.labels.append(draw(bad_labels))
    elif defect == "too many":
        request.labels[:] = [0] * draw(st.sampled_from([17, 1_000, 70_000]))  # max_sample_images is 16 here
    elif defect == "cut":
        request.cut = draw(bad_cuts)
    elif defect == "steps":
        request.num_inference_steps = draw(st.one_of(st.integers(-(2**31), -1), st.integers(T + 1, 2**31 - 1)))
    elif defect == "scheduler":
        request.scheduler = draw(st.text(min_size=1, max_size=20).filter(lambda s: s not in ("ddpm", "ddim")))
    else:
        request.guidance_scale = draw(st.sampled_from([math.nan, math.inf, -1.0, -1e-3]))
    return request


def undecodable(prefixes: tuple[bytes, ...] = UNDECODABLE_PREFIXES) -> st.SearchStrategy[bytes]:
    return st.builds(lambda p, tail: p + tail, st.sampled_from(prefixes), st.binary(max_size=64))


def cases(stored: list[bytes]) -> st.SearchStrategy[Case]:
    """Every kind of example; ``stored`` are serialized chunks the server already holds."""
    ser: Callable[[Any], bytes] = lambda m: m.SerializeToString()
    unary_raw = st.builds(
        lambda method, raw: Case(method, (raw,), False, "raw"),
        st.sampled_from(["Register", "Heartbeat", "Forget", "Sample"]), undecodable(),
    )
    status_raw = st.builds(lambda raw: Case("Status", (raw,), False, "raw"), undecodable(ANY_MESSAGE_UNDECODABLE))
    release_stream = st.builds(
        lambda dups, bad, tail: Case("Release", (*dups, bad, *tail), False, "stream"),
        st.lists(st.sampled_from(stored), max_size=2),
        st.one_of(bad_release_chunk().map(ser), undecodable()),
        st.lists(st.one_of(st.sampled_from(stored), undecodable(), bad_release_chunk().map(ser)), max_size=2),
    )
    return st.one_of(
        unary_raw,
        status_raw,
        release_stream,
        bad_register().map(lambda r: Case("Register", (ser(r),), False, "structured")),
        bad_sample().map(lambda r: Case("Sample", (ser(r),), False, "structured")),
        st.one_of(blank_ids, over_limit_ids).map(
            lambda i: Case("Forget", (ser(collafuse_pb2.ForgetRequest(client_id=i)),), False, "structured")),
        over_limit_ids.map(
            lambda i: Case("Heartbeat", (ser(collafuse_pb2.HeartbeatRequest(client_id=i)),), False, "structured")),
        # Valid calls: answered OK and change nothing that the hashes cover.
        st.one_of(ids, st.just(CLIENT), st.just("")).map(
            lambda i: Case("Heartbeat", (ser(collafuse_pb2.HeartbeatRequest(client_id=i)),), True, "valid")),
        ids.map(lambda i: Case("Forget", (ser(collafuse_pb2.ForgetRequest(client_id=i)),), True, "valid")),
        st.just(Case("Status", (b"",), True, "valid")),
        st.just(Case("Release", (), True, "valid")),
    )


# ---- the server and its fingerprints -----------------------------------------------------------------


def weights_hash(server: CollaFuseServer) -> str:
    digest = hashlib.sha256()
    for model in (server.trainer.model, server.trainer.ema.model):
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def store_hash(server: CollaFuseServer) -> str:
    digest = hashlib.sha256()
    with server.store.reading() as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] != "last_seen"]
            listed = ", ".join(f'"{c}"' for c in columns)
            for row in conn.execute(f'SELECT {listed} FROM "{table}" ORDER BY {listed}'):
                digest.update(repr((table, row)).encode())
    return digest.hexdigest()


def call(channel: grpc.Channel, case: Case) -> grpc.StatusCode:
    identity: Callable[[bytes], bytes] = lambda b: b
    path = SERVICE + case.method
    kwargs: dict[str, Any] = {"request_serializer": identity, "response_deserializer": identity}
    try:
        if case.method in STREAM_REQUEST:
            channel.stream_unary(path, **kwargs)(iter(case.messages), timeout=DEADLINE_S)
        elif case.method in STREAM_RESPONSE:
            list(channel.unary_stream(path, **kwargs)(case.messages[0], timeout=DEADLINE_S))
        else:
            channel.unary_unary(path, **kwargs)(case.messages[0], timeout=DEADLINE_S)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def run_fuzz(tmp_path: Path, examples: int, derandomize: bool) -> Counter[tuple[str, str]]:
    running = start(tmp_path, start_trainer=False)
    seen: Counter[tuple[str, str]] = Counter()
    try:
        api = stub(running)
        register(api, CLIENT, cut=CUT)
        stored_chunks = chunks(CLIENT, CUT, 6, 2, prefix="stored")
        assert upload(api, stored_chunks).stored == 6
        stored = [c.SerializeToString() for c in stored_chunks]
        before = weights_hash(running), store_hash(running)
        channel = open_channel(running.address)

        @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(cases(stored))
        def probe(case: Case) -> None:
            started = time.monotonic()
            code = call(channel, case)
            took = time.monotonic() - started
            seen[(case.method, case.kind)] += 1
            assert took < DEADLINE_S, f"{case.method} took {took:.1f}s"
            if case.valid:
                assert code == grpc.StatusCode.OK, (case, code)
            else:
                assert code in REJECTIONS, (case, code)

        probe()
        channel.close()
        assert api.Status(collafuse_pb2.StatusRequest(), timeout=10).clients[0].releases == 6  # still up
        assert (weights_hash(running), store_hash(running)) == before, "a rejected request changed the model or store"
    finally:
        running.stop(0)
    methods = {method for method, _ in seen}
    assert methods == {"Register", "Heartbeat", "Release", "Forget", "Status", "Sample"}, seen
    return seen


def test_fuzz_every_rpc_short(tmp_path: Path) -> None:
    seen = run_fuzz(tmp_path, examples=150, derandomize=True)
    assert sum(seen.values()) >= 150


@pytest.mark.slow
def test_fuzz_every_rpc_long(tmp_path: Path) -> None:
    seen = run_fuzz(tmp_path, examples=1_200, derandomize=False)
    assert sum(seen.values()) >= 1_000
