"""The release ledger: persistence, pixel keys, seeds bound to content and level, sent-before-send, refusals."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from collafuse.client.errors import ClientError, LedgerRefusal
from collafuse.client.image_identity import ImageIdentity
from collafuse.client.ledger import LEDGER_FILE, Ledger, ReleaseLevel, SentItem

SERVER = "server-1"
L20 = ReleaseLevel(20, 0.6)
L40 = ReleaseLevel(40, 0.3)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    # On the 8-bit grid, as images decoded from files are.
    pixels = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 127.5 - 1


def _send(ledger: Ledger, ids: list[ImageIdentity], level: ReleaseLevel, ack: bool = True, **kw) -> list[int]:  # type: ignore[no-untyped-def]
    """Plan, record as sent and (``ack``) acknowledge, as the ambient protocol does; returns the seeds."""
    plan = ledger.plan_release(ids, level, SERVER, **kw)
    items = [SentItem(ids[i].key, 0, s, f"{ids[i].key}{s}", r) for i, s, r in zip(plan.pending, plan.seeds, plan.re_release)]
    seqs = ledger.record_sent(items, level, "ambient", SERVER)
    if ack:
        ledger.mark_acked(seqs)
    return plan.seeds


def test_ledger_persists_across_reopen(tmp_path):
    images = _images(1)
    with Ledger(tmp_path) as ledger:
        client_id = ledger.client_id()
        ids = ledger.identify(images, ["3/img001.png"])
        ledger.set_fingerprint("f" * 64, SERVER)
        [seed] = _send(ledger, ids, L20)
    with Ledger(tmp_path) as ledger:
        assert ledger.client_id() == client_id
        assert ledger.identify(images) == [ImageIdentity(ids[0].key, ids[0].phash)]
        assert ledger.fingerprint == "f" * 64
        [record] = ledger.releases(ids[0].key)
        assert (record.cut, record.alpha_bar, record.server, record.seed, record.status) == (20, 0.6, SERVER, seed, "acked")
        assert ledger.summary()["releases"] == 1
    # Another workdir has another secret: the same pixels get another key and other noise there.
    with Ledger(tmp_path / "other") as other:
        assert other.image_keys(images) != [ids[0].key]
        assert other.noise_seed(ids[0].key, L20) != seed
        assert other.client_id() != client_id


def test_keys_come_from_pixels_not_files(tmp_path):
    images = _images(2)
    with Ledger(tmp_path) as ledger:
        key = ledger.image_keys(images[:1])[0]
        assert len(key) == 64 and all(ch in "0123456789abcdef" for ch in key)
        # Whatever the file is called, the same pixels are the same image; other pixels another one.
        assert ledger.identify(images[:1], ["cats/my_cat_photo.png"])[0].key == key
        assert ledger.identify(images[:1], ["dogs/renamed.jpg"])[0].key == key
        assert ledger.image_keys(images[1:])[0] != key
        # Float jitter below one 8-bit step does not make another image.
        assert ledger.image_keys(images[:1] + 1e-4)[0] == key
    # The secret stays in the ledger file, which only its owner may read.
    assert (tmp_path / LEDGER_FILE).stat().st_mode & 0o077 == 0


def test_seed_is_bound_to_content_and_level(tmp_path):
    with Ledger(tmp_path) as ledger:
        a, b = ledger.identify(_images(2))
        first = ledger.plan_release([a, b], L20, SERVER).seeds
        assert first[0] != first[1]
        # Same image, same level: the same noise (a resend is byte-identical).
        assert ledger.plan_release([a, b], L20, SERVER).seeds == first
        assert ledger.noise_seed(a.key, L20) == first[0]
        # Another level (even at the same cut number under another schedule): independent noise.
        assert ledger.noise_seed(a.key, L40) != first[0]
        assert ledger.noise_seed(a.key, ReleaseLevel(20, 0.83)) != first[0]


def test_refuses_another_level_until_confirmed_then_counts_it(tmp_path):
    with Ledger(tmp_path) as ledger:
        ids = ledger.identify(_images(3), ["0/0.png", "0/1.png", "0/2.png"])
        first = _send(ledger, ids[:2], L20)
        # Same level: released images are skipped, new ones go.
        again = ledger.plan_release(ids, L20, SERVER)
        assert again.already_released == [0, 1] and again.pending == [2]
        with pytest.raises(LedgerRefusal, match=r"already released at cut 20.*Keep --cut 20.*--re-release-confirm") as info:
            ledger.plan_release(ids, L40, SERVER)
        assert "0/0.png" in str(info.value)
        # The refusal changed nothing.
        assert len(ledger.releases()) == 2
        second = _send(ledger, ids[:2], L40, re_release=True)
        assert set(second).isdisjoint(first)
        summary = ledger.summary()
        assert (summary["releases"], summary["re_releases"], summary["max_levels_per_image"]) == (4, 2, 2)
        # Back at either released level there is nothing new to send.
        assert ledger.plan_release(ids[:2], L20, SERVER).already_released == [0, 1]
        assert ledger.plan_release(ids[:2], L40, SERVER).already_released == [0, 1]


def test_releases_outlive_forget_and_reset(tmp_path):
    with Ledger(tmp_path) as ledger:
        key = ledger.identify(_images(1))
        [seed] = _send(ledger, key, L20)
        ledger.record_forget(SERVER, 1)
        with pytest.raises(LedgerRefusal, match="forget"):
            ledger.plan_release(key, L20, SERVER)
        # An image never released may go after a forget.
        fresh = ledger.identify(_images(1, seed=1))
        assert ledger.plan_release(fresh, L20, SERVER).pending == [0]
        ledger.set_fingerprint("f" * 64, SERVER)
        ledger.reset()
        assert ledger.fingerprint == ""
        # A reset does not make a second release possible: neither after the forget nor at another level.
        with pytest.raises(LedgerRefusal, match="forget"):
            ledger.plan_release(key, L20, SERVER)
        with pytest.raises(LedgerRefusal, match="already released at cut 20"):
            ledger.plan_release(key, L40, SERVER)
        # Confirmed after the forget: the same bytes again (nothing new for a server that kept them), counted.
        assert _send(ledger, key, L20, re_release=True) == [seed]
        assert [(r.seed, r.re_release) for r in ledger.releases(key[0].key)] == [(seed, 0), (seed, 1)]
        assert [e["kind"] for e in ledger.events()] == ["forget", "reset"]


def test_sent_without_ack_counts_as_released(tmp_path):
    with Ledger(tmp_path) as ledger:
        ids = ledger.identify(_images(1))
        [seed] = _send(ledger, ids, L20, ack=False)
        [record] = ledger.releases()
        assert record.status == "sent" and ledger.summary()["sent_unacknowledged"] == 1
        # At another level it is a second release; at the same level a resend of the same bytes.
        with pytest.raises(LedgerRefusal, match="already released at cut 20"):
            ledger.plan_release(ids, L40, SERVER)
        plan = ledger.plan_release(ids, L20, SERVER)
        assert plan.pending == [0] and plan.seeds == [seed] and plan.re_release == [False]
        _send(ledger, ids, L20)
        [record] = ledger.releases()  # the resend completed the same record
        assert record.status == "acked"


def test_client_id_is_kept_and_a_different_one_is_refused(tmp_path):
    with Ledger(tmp_path) as ledger:
        assert ledger.client_id("alice") == "alice"
        assert ledger.client_id() == "alice"
        with pytest.raises(LedgerRefusal, match="belongs to client 'alice'"):
            ledger.client_id("bob")


def test_a_corrupt_ledger_is_a_clear_error_and_is_left_alone(tmp_path):
    path = tmp_path / LEDGER_FILE
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(Exception, match="cannot be read.*restore it from a backup"):
        Ledger(tmp_path)
    assert path.read_bytes() == b"not a database" * 100
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(path).execute("SELECT * FROM meta").fetchall()


def test_an_old_ledger_is_kept_and_refused_with_advice(tmp_path):
    db = sqlite3.connect(tmp_path / LEDGER_FILE)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.commit()
    db.close()
    with pytest.raises(ClientError, match="schema 1.*fresh --workdir forgets what was released"):
        Ledger(tmp_path)
