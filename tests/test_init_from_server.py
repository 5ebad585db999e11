"""``--init-from-server`` / ``--share-model``: a client starts its low-noise model from the shared model's weights.

The server's side: FetchModel answers only a --share-model server, only registered clients, only once the trainer
took a step, and what it streams is exactly the EMA model its Sample calls use. The client's side: what a hostile or
broken server streams (another preset, too many bytes, a wrong hash, other tensors, NaN, no header) is refused with
a ClientError before anything is loaded. The trainer's side: a fresh local model is the shared one, and a model
started from other weights is not resumed. The outcome (the model a user gets) is
test_a_client_started_from_the_shared_model_keeps_the_class_better.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import safetensors.torch
import torch
from outcome_support import digits_folder, digits_server, label_accuracy
from server_support import CLASSES, SHAPE, chunks, register, rpc_error, start, stub, upload, wait_phase

from collafuse.client.connection import ServerConnection
from collafuse.client.errors import ClientError
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.shared_model import fetch_initial_weights
from collafuse.client.trainer import SET_ASIDE, checkpoint_root, train_local
from collafuse.common.config import ClientSettings
from collafuse.common.models import build_unet, load_model
from collafuse.common.rpc import RetryPolicy
from collafuse.common.schedule import ScheduleConfig
from collafuse.deploy.sim import SimSettings, client_settings, server_settings
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

torch.set_num_threads(1)


def _state(model: Any) -> dict[str, torch.Tensor]:
    return cast(torch.nn.Module, model).state_dict()


def _equal(a: Any, b: Any) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- the server ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A --share-model server trained 3 steps on alice's releases; weights streamed in 1 KiB pieces."""
    store = tmp_path_factory.mktemp("share")
    server = start(store, share_model=True, chunk_bytes=1024)
    api = stub(server)
    register(api, "alice")
    upload(api, chunks("alice", 20, 6, 3))
    wait_phase(api, "done")
    yield server, store
    server.stop(0)


def test_the_stream_is_the_ema_model_that_samples(sharing: Any) -> None:
    server, store = sharing
    parts = list(stub(server).FetchModel(collafuse_pb2.FetchModelRequest(client_id="alice"), timeout=30))
    header = parts[0].header
    data = b"".join(p.data for p in parts[1:])
    assert parts[0].WhichOneof("part") == "header" and all(p.WhichOneof("part") == "data" for p in parts[1:])
    assert len(parts) > 10 and all(len(p.data) <= 1024 for p in parts[1:])  # in pieces, in order
    assert (header.preset, header.step, header.total_bytes) == ("tiny", 3, len(data))
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    ema, meta = load_model(store / "checkpoints" / "latest" / "ema")  # the final checkpoint at step 3
    assert meta["step"] == 3
    tensors = safetensors.torch.load(data)
    assert tensors.keys() == _state(ema).keys()
    assert all(torch.equal(tensors[k], v) for k, v in _state(ema).items())
    # And through the client's checks: the same weights, in a model of the client's own building.
    with ServerConnection(server.address, policy=RetryPolicy(attempts=1)) as connection:
        loaded = fetch_initial_weights(connection, "alice", SHAPE, len(CLASSES))
    assert (loaded.preset, loaded.step, loaded.sha256) == ("tiny", 3, header.sha256)
    assert _equal(loaded.model, ema)


def test_an_unregistered_client_is_refused(sharing: Any) -> None:
    server, _ = sharing
    error = rpc_error(stub(server).FetchModel, collafuse_pb2.FetchModelRequest(client_id="mallory"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "not registered" in error.details()
    error = rpc_error(stub(server).FetchModel, collafuse_pb2.FetchModelRequest(client_id=" "))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_server_shares_only_when_told_and_only_trained_weights(tmp_path: Path) -> None:
    closed = start(tmp_path / "closed", start_trainer=False)  # the default: --share-model off
    untrained = start(tmp_path / "untrained", start_trainer=False, share_model=True)
    try:
        for server, words in ((closed, "--share-model"), (untrained, "has not trained")):
            register(stub(server), "alice")
            error = rpc_error(stub(server).FetchModel, collafuse_pb2.FetchModelRequest(client_id="alice"))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and words in error.details(), error.details()
            with ServerConnection(server.address, policy=RetryPolicy(attempts=1)) as connection, \
                    pytest.raises(ClientError, match="FAILED_PRECONDITION|share"):
                fetch_initial_weights(connection, "alice", SHAPE, len(CLASSES))
    finally:
        closed.stop(0)
        untrained.stop(0)


# ---- the client against a hostile server -----------------------------------------------------------------------


def _weights(preset: str = "tiny", mutate: Callable[[dict[str, torch.Tensor]], None] | None = None) -> bytes:
    tensors = {k: v.clone() for k, v in _state(build_unet(preset, SHAPE, len(CLASSES))).items()}
    if mutate is not None:
        mutate(tensors)
    return safetensors.torch.save(tensors)


def _header(data: bytes, **changes: Any) -> collafuse_pb2.ModelChunk:
    fields: dict[str, Any] = {"preset": "tiny", "step": 7, "total_bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest(), **changes}
    return collafuse_pb2.ModelChunk(header=collafuse_pb2.ModelHeader(**fields))


def _pieces(data: bytes, size: int = 4096) -> list[collafuse_pb2.ModelChunk]:
    return [collafuse_pb2.ModelChunk(data=data[i:i + size]) for i in range(0, len(data), size)]


def _first_weight(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if k.endswith(".weight"))


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_first_weight(tensors)].view(-1)[0] = float("nan")


def _reshaped(tensors: dict[str, torch.Tensor]) -> None:
    name = _first_weight(tensors)
    tensors[name] = torch.zeros(tensors[name].numel() + 1)


def _extra(tensors: dict[str, torch.Tensor]) -> None:
    tensors["backdoor.weight"] = torch.zeros(3)


def _half(tensors: dict[str, torch.Tensor]) -> None:
    name = _first_weight(tensors)
    tensors[name] = tensors[name].half()


GOOD = _weights()
WITH_NAN, RESHAPED, HALF, EXTRA, SMALL = (_weights(mutate=_nan), _weights(mutate=_reshaped), _weights(mutate=_half),
                                         _weights(mutate=_extra), _weights("small"))
# A stream a hostile or broken server might send, and what the client's error must say.
HOSTILE: dict[str, tuple[list[collafuse_pb2.ModelChunk], str]] = {
    "unknown preset": ([_header(GOOD, preset="giant"), *_pieces(GOOD)], "does not know"),
    "no header": (_pieces(GOOD), "before FetchModel's header"),
    "two headers": ([_header(GOOD), _header(GOOD)], "header twice"),
    "empty": ([], "without a header"),
    "fewer bytes than announced": ([_header(GOOD), *_pieces(GOOD)[:-1]], "announced"),
    "more bytes than the preset holds": (
        [_header(GOOD, total_bytes=1 << 40), *_pieces(SMALL * 40)], "more than the"),
    "more bytes than announced": ([_header(GOOD), *_pieces(GOOD + b"x")], "more than the"),
    "wrong hash": ([_header(GOOD, sha256="0" * 64), *_pieces(GOOD)], "corrupt"),
    "not safetensors": ([_header(b"\x00" * 64), *_pieces(b"\x00" * 64)], "safetensors"),
    "NaN": ([_header(WITH_NAN), *_pieces(WITH_NAN)], "NaN"),
    "another shape": ([_header(RESHAPED), *_pieces(RESHAPED)], "not float32"),
    "half precision": ([_header(HALF), *_pieces(HALF)], "not float32"),
    "an extra tensor": ([_header(EXTRA), *_pieces(EXTRA)], "unexpected"),
    "another preset's tensors": ([_header(SMALL), *_pieces(SMALL)], "do not match"),
    "untrained": ([_header(GOOD, step=0), *_pieces(GOOD)], "not trained"),
}


class _Streaming(collafuse_pb2_grpc.CollaFuseServicer):
    def __init__(self, messages: list[collafuse_pb2.ModelChunk]) -> None:
        self.messages = messages

    def FetchModel(self, request: Any, context: Any) -> Iterator[collafuse_pb2.ModelChunk]:
        yield from self.messages


def _fetch_from(messages: list[collafuse_pb2.ModelChunk]) -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", 64 << 20)])
    collafuse_pb2_grpc.add_CollaFuseServicer_to_server(_Streaming(messages), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ServerConnection(f"127.0.0.1:{port}", policy=RetryPolicy(attempts=1)) as connection:
            return fetch_initial_weights(connection, "alice", SHAPE, len(CLASSES))
    finally:
        server.stop(0)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_client_refuses_what_a_hostile_server_streams(case: str) -> None:
    messages, words = HOSTILE[case]
    with pytest.raises(ClientError, match=words) as refused:
        _fetch_from(messages)
    if case not in ("no header", "two headers", "empty"):
        assert "--init-from-server" in str(refused.value) or "announced" in str(refused.value)


def test_the_honest_stream_of_the_same_fake_loads() -> None:
    """The fake above streams correctly when told to: the refusals are the checks', not the fake's."""
    loaded = _fetch_from([_header(GOOD), *_pieces(GOOD)])
    assert loaded.step == 7 and torch.equal(_state(loaded.model)[_first_weight(_state(loaded.model))],
                                            safetensors.torch.load(GOOD)[_first_weight(_state(loaded.model))])


# ---- the trainer and the settings ------------------------------------------------------------------------------


def test_a_fresh_local_model_is_the_shared_one_and_other_weights_are_not_resumed(tmp_path: Path) -> None:
    data = _weights()
    header = _header(data).header
    from collafuse.client.shared_model import load_initial_weights

    def initial(seed: int) -> Any:
        model = build_unet("tiny", SHAPE, len(CLASSES))
        with torch.no_grad():
            for p in cast(torch.nn.Module, model).parameters():
                p.add_(0.01 * seed)
        raw = safetensors.torch.save({k: v.contiguous() for k, v in _state(model).items()})
        return load_initial_weights(_header(raw).header, raw, build_unet("tiny", SHAPE, len(CLASSES)))

    assert header.total_bytes == len(data)
    images, labels = torch.rand((6, *SHAPE)) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    # A preset the client would not pick itself: the local model takes the server's.
    settings = ClientSettings(workdir=tmp_path, train_steps=0, batch_size=4, device="cpu", model_preset="base")

    def train(init: Any, steps: int) -> Any:
        return train_local(images=images, labels=labels, num_classes=len(CLASSES), image_shape=SHAPE,
                           schedule=ScheduleConfig(num_train_timesteps=50), cut=20, fingerprint="f", workdir=tmp_path,
                           settings=settings.model_copy(update={"train_steps": steps}), show_progress=False, init=init)

    first = initial(1)
    done = train(first, 0)
    saved, meta = load_model(done.model_dir)
    assert meta["preset"] == "tiny" and _equal(saved, first.model)  # step 0: exactly the shared weights
    train(first, 2)
    assert not (checkpoint_root(tmp_path) / SET_ASIDE).exists()  # the same start: resumed
    second = initial(2)
    train(second, 2)
    assert (checkpoint_root(tmp_path) / SET_ASIDE).exists()  # other weights: trained afresh, the old model kept


def test_settings_refuse_what_cannot_start_from_the_server() -> None:
    with pytest.raises(ValueError, match="split protocol"):
        ClientSettings(init_from_server=True, protocol="split")
    with pytest.raises(ValueError, match="--no-wait-for-server"):
        ClientSettings(init_from_server=True, wait_for_server=False)
    assert ClientSettings().init_from_server is False
    sim = SimSettings(clients=2, cuts=[200, 1000], init_from_server=True, image_size=8, channels=1)
    assert server_settings(sim, 1, ["0"]).share_model is True
    # Cut T has no server steps to wait for and so no trained shared model: it trains from scratch.
    assert [client_settings(sim, k, Path("x"), 1).init_from_server for k in (0, 1)] == [True, False]
    assert server_settings(sim.model_copy(update={"init_from_server": False}), 1, ["0"]).share_model is False


# ---- the outcome ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # under a minute on 2 cores; `make test-faults` (CI) runs it, benchmarks/cut_study.py measures it
def test_a_client_started_from_the_shared_model_keeps_the_class_better(tmp_path: Path) -> None:
    """The outcome for a user who picks --init-from-server. Real digits (8x8, ten classes) at cut 200 of T = 1000:
    the client releases them to a --share-model server, which trains 300 steps; then two local models of the same
    preset train the same 100 steps on t <= 200, one from scratch and one from the shared model's weights, and each
    generates ten images per class through the server. The started one must read as its label (a pixel classifier;
    at least 0.75, chance is 0.1) and beat the one from scratch by 0.1.
    Measured on 2 cores (44 s): 0.90 against 0.67 from scratch (client seed 0), 0.83 against 0.60 (seed 1)."""
    torch.set_num_threads(1)
    classifier = digits_folder(tmp_path / "data")
    server = digits_server(tmp_path / "store", share_model=True)
    base = ClientSettings(data=tmp_path / "data", server=server.address, workdir=tmp_path / "cold", cut=200,
                          train_steps=100, batch_size=32, lr=2e-3, retries=2, rpc_timeout=300, device="cpu", seed=0,
                          samples_per_class=10, inference_steps=50)
    scores = {}
    try:
        with ClientLifecycle(base, show_progress=False, poll_interval=0.05) as client:
            client.contribute()
        for name, init in (("cold", False), ("warm", True)):
            settings = base.model_copy(update={"workdir": tmp_path / name, "init_from_server": init})
            with ClientLifecycle(settings, show_progress=False, poll_interval=0.05) as client:
                client.register()
                client.train()
                client.wait_for_server()
                result = client.generate()
            assert result is not None and len(result.labels) == 100
            scores[name] = label_accuracy(classifier, result.x0, result.labels)
    finally:
        server.stop(0)
    assert scores["warm"] >= 0.75, f"started from the shared model, samples should match their labels: {scores}"
    assert scores["warm"] >= scores["cold"] + 0.1, f"starting from the shared model does not help: {scores}"
