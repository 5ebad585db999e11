"""Release payloads: exactly x0·√ᾱ_ζ + √(1-ᾱ_ζ)·ε(seed), byte-identical on retries, recorded as sent before the call
and as acknowledged after the ack."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from client_fake_server import FakeServer, FakeState
from diffusers import DDPMScheduler

from collafuse.client.connection import ServerConnection
from collafuse.client.ledger import Ledger
from collafuse.client.protocols.ambient import AmbientClient, ReleaseReport, build_chunks
from collafuse.common.codec import encode
from collafuse.common.rpc import RetryPolicy
from collafuse.common.schedule import ScheduleConfig

torch.set_num_threads(1)
T = 50


def _images(n: int = 6) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(7)
    return torch.rand((n, 1, 8, 8), generator=gen) * 2 - 1, [i % 3 for i in range(n)]


def _release(fake: FakeServer, ledger: Ledger, images: torch.Tensor, labels: list[int], cut: int, **kw):  # type: ignore[no-untyped-def]
    keys = ledger.image_keys(images)
    with ServerConnection(fake.target, policy=RetryPolicy(attempts=3), sleep=lambda s: None) as conn:
        report = AmbientClient().contribute(
            conn, ledger, client_id="c1", images=images, labels=labels, paths=None, cut=cut,
            schedule=ScheduleConfig(num_train_timesteps=T), server=fake.target, **kw,
        )
        assert isinstance(report, ReleaseReport)
        return report, keys, conn.traffic_report()


def test_release_payload_is_the_forward_marginal_with_the_ledger_seed(tmp_path):
    images, labels = _images()
    cut = 20
    # Independent of common/: diffusers' own 0-based alphas_cumprod, paper's t = cut.
    alpha_bar = DDPMScheduler(num_train_timesteps=T).alphas_cumprod[cut - 1].double()
    with FakeServer() as fake, Ledger(tmp_path) as ledger:
        report, keys, traffic = _release(fake, ledger, images, labels, cut)
        assert (report.sent, report.stored, report.duplicates) == (6, 6, 0)
        assert traffic["Release"]["bytes_sent"] > report.payload_bytes > 0
        for i, key in enumerate(keys):
            stored = fake.servicer.store[("c1", key)]
            [record] = ledger.releases(key)
            eps = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(record.seed))
            expected = (alpha_bar.sqrt() * images[i].double() + (1 - alpha_bar).sqrt() * eps.double()).float()
            torch.testing.assert_close(stored.x_cut, expected, rtol=0, atol=1e-6)
            assert stored.label == labels[i] and stored.cut == cut
            assert record.payload_sha256 == hashlib.sha256(stored.data).hexdigest()
            # Nothing image-derived but x_cut left: x0 itself is not in the payload.
            assert not torch.allclose(stored.x_cut, images[i], atol=1e-3)


def test_lost_ack_is_retried_with_identical_bytes_and_recorded_once(tmp_path):
    images, labels = _images()
    with FakeServer(FakeState(lose_release_acks=1)) as fake, Ledger(tmp_path) as ledger:
        report, _, traffic = _release(fake, ledger, images, labels, 20)
        assert fake.servicer.release_calls == 2
        assert traffic["Release"]["attempts"] == 2 and traffic["Release"]["calls"] == 1
        assert (report.stored, report.duplicates) == (0, 6)  # the first attempt had stored them
        half = len(fake.servicer.transcript) // 2
        first, second = fake.servicer.transcript[:half], fake.servicer.transcript[half:]
        assert [c.SerializeToString() for c in first] == [c.SerializeToString() for c in second]
        assert len(fake.servicer.store) == 6
        assert ledger.summary()["max_releases_per_image"] == 1
        # Running the release again sends nothing.
        again, _, _ = _release(fake, ledger, images, labels, 20)
        assert (again.sent, again.already_released) == (0, 6)
        assert fake.servicer.release_calls == 2


def test_sent_is_recorded_before_the_ack_and_a_rerun_resends_identical_bytes(tmp_path, monkeypatch):
    images, labels = _images()
    with FakeServer() as fake, Ledger(tmp_path) as ledger:
        original = ledger.mark_acked

        def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt  # the process dies between the server's ack and the ledger write

        monkeypatch.setattr(ledger, "mark_acked", crash)
        with pytest.raises(KeyboardInterrupt):
            _release(fake, ledger, images, labels, 20)
        # What may have reached the server counts as released.
        assert [r.status for r in ledger.releases()] == ["sent"] * 6
        sent_first = {item.image_key: item.x_cut.data for c in fake.servicer.transcript for item in c.items}
        monkeypatch.setattr(ledger, "mark_acked", original)
        report, _, _ = _release(fake, ledger, images, labels, 20)
        assert (report.sent, report.stored, report.duplicates) == (6, 0, 6)
        sent_again = {item.image_key: item.x_cut.data for c in fake.servicer.transcript[1:] for item in c.items}
        assert sent_again == sent_first
        assert [r.status for r in ledger.releases()] == ["acked"] * 6


def test_cut_T_releases_nothing_and_cut_zero_warns_loudly(tmp_path, caplog):
    images, labels = _images(3)
    with FakeServer() as fake, Ledger(tmp_path) as ledger:
        report, _, _ = _release(fake, ledger, images, labels, T)
        assert report.sent == 0 and fake.servicer.transcript == []
        with caplog.at_level(logging.WARNING):
            report, keys, _ = _release(fake, ledger, images, labels, 0)
        assert "RAW IMAGES" in caplog.text and "not a private setting" in caplog.text
        assert report.sent == 3
        torch.testing.assert_close(fake.servicer.store[("c1", keys[0])].x_cut, images[0], rtol=0, atol=0)


def test_chunks_stay_under_the_limit_and_keep_every_item():
    x = torch.randn(40, 1, 8, 8)
    item_bytes = encode(x[0]).ByteSize()
    limit = 5 * item_bytes
    chunks, digests = build_chunks("c1", 20, [f"k{i}" for i in range(40)], [0] * 40, x, limit=limit)
    assert len(chunks) > 1 and all(c.ByteSize() <= limit for c in chunks)
    assert [item.image_key for c in chunks for item in c.items] == [f"k{i}" for i in range(40)]
    assert len(set(digests)) == 40
