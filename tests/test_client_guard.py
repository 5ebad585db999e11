"""The client protects itself from a curious server (issue 8, docs/design.md §7): one test per attack.

Each test runs the attack against a deliberately misbehaving server (``CuriousServicer``:
it keeps every payload it is sent, ignores Forget, can fail a Release after storing it, and
sends whatever schedule it likes), shows what the attack gains on the old behaviour, and
that the client now refuses or sends nothing extra. ``payloads`` reads the server's own
record of every byte it received.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from client_fake_server import FakeServer, FakeServicer, FakeState, make_image_folder
from PIL import Image

from collafuse.client.errors import ClientError, LedgerRefusal
from collafuse.client.image_identity import psnr_db
from collafuse.client.lifecycle import ClientLifecycle
from collafuse.client.noise_floor import NoiseFloorRefusal
from collafuse.client.protocols.ambient import AmbientClient
from collafuse.common.codec import decode
from collafuse.common.config import ClientSettings
from collafuse.common.data import load_image_folder, save_png
from collafuse.common.diffusion import release
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.v1 import collafuse_pb2

torch.set_num_threads(1)
HONEST = ScheduleConfig(num_train_timesteps=50)
BENT = {
    "T=500": ScheduleConfig(num_train_timesteps=500),
    "tiny betas": ScheduleConfig(num_train_timesteps=50, beta_start=1e-6, beta_end=1e-5),
}


class CuriousServicer(FakeServicer):
    """Keeps everything it gets (Forget claims to remove, removes nothing); can fail Release after storing."""

    def __init__(self, state: FakeState, fail_after_store: int = 0) -> None:
        super().__init__(state)
        self.fail_after_store = fail_after_store

    def Forget(self, request, context):  # type: ignore[no-untyped-def]
        return collafuse_pb2.ForgetReply(removed=sum(1 for cid, _ in self.store if cid == request.client_id))

    def Release(self, request_iterator, context):  # type: ignore[no-untyped-def]
        ack = super().Release(request_iterator, context)
        if self.fail_after_store > 0:
            self.fail_after_store -= 1
            context.abort(grpc.StatusCode.INTERNAL, "simulated: stored, then failed the call")
        return ack


def curious(schedule: ScheduleConfig = HONEST, shape: tuple[int, int, int] = (1, 8, 8), **kw: int) -> FakeServer:
    return FakeServer(servicer=CuriousServicer(FakeState(schedule=schedule, image_shape=shape), **kw))


def payloads(server: FakeServer) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Every (cut, x_cut) the server received per image key, in arrival order (its own transcript)."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for chunk in server.servicer.transcript:
        for item in chunk.items:
            out[item.image_key].append((int(chunk.cut), decode(item.x_cut, what="x_cut")))
    return out


def settings(tmp_path: Path, target: str, **overrides: Any) -> ClientSettings:
    values: dict[str, Any] = {"data": tmp_path / "data", "server": target, "workdir": tmp_path / "work", "cut": 20,
                                 "retries": 2, "rpc_timeout": 10, "device": "cpu"}
    return ClientSettings(**{**values, **overrides})


def release_once(s: ClientSettings) -> None:
    with ClientLifecycle(s) as client:
        client.contribute()


def solve_two_levels(x_a: torch.Tensor, a: float, x_b: torch.Tensor, b: float) -> torch.Tensor:
    """The 2x2 attack: x_a, x_b = sqrt(ab) x0 + sqrt(1 - ab) eps with the SAME eps at two levels -> x0 exactly."""
    det = math.sqrt(a * (1 - b)) - math.sqrt(b * (1 - a))
    return (math.sqrt(1 - b) * x_a.double() - math.sqrt(1 - a) * x_b.double()) / det


# -- 1. the server decides the noise ----------------------------------------------------------------


@pytest.mark.parametrize("bent", list(BENT))
def test_a_bent_schedule_is_refused_and_nothing_leaves(tmp_path, bent):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    floor = float(HONEST.alphas_cumprod()[20])
    asked = float(BENT[bent].alphas_cumprod()[20])
    assert asked > floor  # what the attack gains on a client that takes the server's word: less noise at "cut 20"
    with curious() as honest:
        release_once(settings(tmp_path, honest.target))
    # The server comes back with a bent schedule; the user follows the documented path (reset) to rejoin it.
    make_image_folder(tmp_path / "data", classes=("1",), per_class=2, seed=1)
    with curious(BENT[bent]) as server:
        with ClientLifecycle(settings(tmp_path, server.target)) as client:
            client.reset()
            with pytest.raises(NoiseFloorRefusal, match=rf"gives alpha_bar {asked:.4g} .*at cut 20, your floor is {floor:.4g}"):
                client.contribute()
            # A caller that skips Register (or a server whose schedule changes later) meets the same check.
            data = load_image_folder(tmp_path / "data", 1, 8)
            with pytest.raises(NoiseFloorRefusal, match="refusing to release with less noise"):
                AmbientClient().contribute(
                    client.connection, client.ledger, client_id=client.client_id, images=data.images,
                    labels=[0] * len(data), paths=data.paths, cut=20, schedule=BENT[bent], server="bent",
                )
        assert server.servicer.transcript == []
    # A fresh client that states its floor refuses the bent server at first contact (trust on first use
    # alone would have pinned the bent schedule).
    with curious(BENT[bent]) as server:
        with pytest.raises(NoiseFloorRefusal, match=f"server schedule {'T=500' if bent == 'T=500' else 'T=50'}"):
            release_once(settings(tmp_path, server.target, workdir=tmp_path / "w2", max_release_alpha_bar=floor))
        assert server.servicer.transcript == []


def test_a_lower_cut_is_refused_by_the_floor_and_the_floor_is_the_users_word(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    with curious() as server:
        release_once(settings(tmp_path, server.target, cut=20))
        make_image_folder(tmp_path / "data", classes=("1",), per_class=2, seed=1)
        sent = len(server.servicer.transcript)
        with pytest.raises(NoiseFloorRefusal, match="at cut 10, your floor is"):
            release_once(settings(tmp_path, server.target, cut=10))
        assert len(server.servicer.transcript) == sent
        # More noise is always fine (new images only: the old ones stay at their level).
        release_once(settings(tmp_path, server.target, cut=30, workdir=tmp_path / "w2"))


# -- 2. a reset reused the noise at a new level: exact recovery ----------------------------------------


def test_reset_does_not_reuse_noise_at_another_level(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    x0 = load_image_folder(tmp_path / "data", 1, 8).images
    ab = HONEST.alphas_cumprod()
    a, b = float(ab[20]), float(ab[40])
    # The old path: the same seed at two cuts. Two equations per pixel give x0 exactly.
    old = solve_two_levels(release(x0, [7, 8], 20, ab), a, release(x0, [7, 8], 40, ab), b)
    assert psnr_db(old, x0) > 90

    with curious() as server:
        release_once(settings(tmp_path, server.target, cut=20))
        with ClientLifecycle(settings(tmp_path, server.target, cut=40)) as client:
            client.forget()  # the curious server keeps everything anyway
            client.reset()
            with pytest.raises(LedgerRefusal, match="already released at cut 20.*--re-release-confirm"):
                client.contribute()
        assert all(len(p) == 1 for p in payloads(server).values())
        # Confirmed: sent again with independent noise, and counted.
        with ClientLifecycle(settings(tmp_path, server.target, cut=40, re_release_confirm=True)) as client:
            assert client.contribute().re_released == 2
            assert client.ledger.summary()["max_levels_per_image"] == 2
            keys = client.ledger.image_keys(x0)
        received = payloads(server)
    for i, key in enumerate(keys):
        (cut_a, x_a), (cut_b, x_b) = received[key]
        assert (cut_a, cut_b) == (20, 40)
        assert psnr_db(solve_two_levels(x_a, a, x_b, b), x0[i]) < 20, f"image {i}: the 2x2 attack recovered x0"


# -- 3. copies average the noise away ---------------------------------------------------------------


def _digit_folder(root: Path) -> torch.Tensor:
    """Four digits at 16x16, then copies of them: moved+renamed, re-encoded PNG, JPEG, larger resolution."""
    images, _ = digits_arrays(16)
    originals = images[[0, 1, 2, 3]]
    for i, img in enumerate(originals):
        save_png(img, root / "0" / f"{i}.png")
    pixels = np.clip((originals[:, 0] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    (root / "1").mkdir(parents=True)
    (root / "1" / "holiday.png").write_bytes((root / "0" / "0.png").read_bytes())  # moved and renamed
    Image.fromarray(pixels[1]).save(root / "1" / "b.png", compress_level=0)  # same pixels, other bytes
    buffer = io.BytesIO()
    Image.fromarray(pixels[2]).save(buffer, "JPEG", quality=90)
    (root / "1" / "c.jpg").write_bytes(buffer.getvalue())  # lossy re-encode
    Image.fromarray(pixels[3]).resize((40, 40), Image.Resampling.BICUBIC).save(root / "1" / "d_large.png")
    return torch.from_numpy(originals)


def test_copies_are_released_once(tmp_path, caplog):
    x0 = _digit_folder(tmp_path / "data")
    ab = HONEST.alphas_cumprod()
    a = float(ab[20])
    # The old path (keys from file names and bytes): every copy fresh noise; averaging 4 gains ~6 dB.
    one = release(x0[:1].repeat(4, 1, 1, 1), [1, 2, 3, 4], 20, ab) / math.sqrt(a)
    assert psnr_db(one.mean(0), x0[0]) - psnr_db(one[0], x0[0]) > 4

    with curious(shape=(1, 16, 16)) as server:
        with ClientLifecycle(settings(tmp_path, server.target)) as client:
            report = client.contribute()
        received = payloads(server)
        assert (report.images, report.sent, report.copies) == (8, 4, 4)
        assert len(received) == 4 and all(len(p) == 1 for p in received.values())
        for name in ("1/holiday.png", "1/b.png", "1/c.jpg", "1/d_large.png"):
            assert f"not releasing {name}: it is" in caplog.text
        assert "the same pixels as 0/0.png" in caplog.text and "near-duplicate of 0/2.png" in caplog.text
        # A copy added later is caught against the release already made, by hash alone once the original is gone.
        for path in (tmp_path / "data" / "0").iterdir():
            path.unlink()
        (tmp_path / "data" / "1" / "holiday.png").rename(tmp_path / "data" / "0" / "again.png")
        with ClientLifecycle(settings(tmp_path, server.target)) as client:
            report = client.contribute()
        assert report.sent == 0 and len(payloads(server)) == 4


# -- 4. a failed RPC is not an unsent release -------------------------------------------------------


def test_a_failed_call_counts_as_released(tmp_path):
    make_image_folder(tmp_path / "data", classes=("0",), per_class=2)
    with curious(fail_after_store=1) as server:
        with pytest.raises(ClientError, match="INTERNAL"):
            release_once(settings(tmp_path, server.target, cut=20))
        assert len(server.servicer.store) == 2  # the server kept them, the client got no ack
        with ClientLifecycle(settings(tmp_path, server.target, cut=40)) as client:
            assert client.ledger.summary()["sent_unacknowledged"] == 2
            with pytest.raises(LedgerRefusal, match="already released at cut 20"):
                client.contribute()
        assert {cut for p in payloads(server).values() for cut, _ in p} == {20}
        # Back at cut 20 the very same bytes go again and the records are completed.
        first = {k: v[0][1] for k, v in payloads(server).items()}
        with ClientLifecycle(settings(tmp_path, server.target, cut=20)) as client:
            assert client.contribute().duplicates == 2
            assert client.ledger.summary()["sent_unacknowledged"] == 0
        for key, got in payloads(server).items():
            assert torch.equal(got[1][1], first[key])
