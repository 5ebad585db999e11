"""The release ledger: persistence, per-image seeds, opaque keys, and its refusals."""

from __future__ import annotations

import sqlite3

import pytest

from collafuse.client.errors import LedgerRefusal
from collafuse.client.ledger import LEDGER_FILE, AckedItem, Ledger

SERVER = "host:50051"


def _record(ledger: Ledger, keys: list[str], seeds: list[int], cut: int, server: str = SERVER) -> None:
    ledger.record_releases([AckedItem(k, 0, s, "ab" * 32) for k, s in zip(keys, seeds)], cut, "ambient", server)


def test_ledger_persists_across_reopen(tmp_path):
    with Ledger(tmp_path) as ledger:
        client_id = ledger.client_id()
        key = ledger.image_key("3/img001.png", b"pixels")
        seed = ledger.seed_for(key)
        ledger.set_fingerprint("f" * 64, SERVER)
        plan = ledger.plan_release([key], 20, "ambient", SERVER)
        _record(ledger, [key], plan.seeds, 20)
    with Ledger(tmp_path) as ledger:
        assert ledger.client_id() == client_id
        assert ledger.image_key("3/img001.png", b"pixels") == key
        assert ledger.seed_for(key) == seed
        assert ledger.fingerprint == "f" * 64
        [record] = ledger.releases(key)
        assert (record.cut, record.server, record.seed, record.protocol) == (20, SERVER, seed, "ambient")
        assert ledger.summary()["releases"] == 1
    # Another workdir has another secret: the same file gets another key there.
    with Ledger(tmp_path / "other") as other:
        assert other.image_key("3/img001.png", b"pixels") != key
        assert other.client_id() != client_id


def test_same_image_same_seed_and_seeds_differ_between_images(tmp_path):
    with Ledger(tmp_path) as ledger:
        a, b = ledger.image_key("0/a.png", b"a"), ledger.image_key("0/b.png", b"b")
        first = ledger.seeds([a, b])
        assert ledger.seeds([a, b]) == first
        assert ledger.seed_for(a) == first[0]
        assert first[0] != first[1]
        # Planning a release at the cut keeps the seed: a re-release sends identical bytes.
        assert ledger.plan_release([a], 100, "ambient", SERVER).seeds == [first[0]]
        assert ledger.plan_release([a], 100, "ambient", SERVER).seeds == [first[0]]


def test_image_keys_are_hmacs_not_file_names(tmp_path):
    with Ledger(tmp_path) as ledger:
        key = ledger.image_key("cats/my_cat_photo.png", b"content")
        assert len(key) == 64 and all(ch in "0123456789abcdef" for ch in key)
        assert "cat" not in key and "photo" not in key and "png" not in key
        # Content and path both enter the key.
        assert ledger.image_key("cats/my_cat_photo.png", b"other content") != key
        assert ledger.image_key("cats/renamed.png", b"content") != key
    # The secret stays in the ledger file, which only its owner may read.
    assert (tmp_path / LEDGER_FILE).stat().st_mode & 0o077 == 0


def test_refuses_release_at_a_different_cut(tmp_path):
    with Ledger(tmp_path) as ledger:
        keys = [ledger.image_key(f"0/{i}.png", bytes([i])) for i in range(3)]
        plan = ledger.plan_release(keys[:2], 20, "ambient", SERVER)
        assert plan.pending == [0, 1]
        _record(ledger, keys[:2], plan.seeds, 20)
        # Same cut: released images are skipped, new ones go.
        again = ledger.plan_release(keys, 20, "ambient", SERVER)
        assert again.already_released == [0, 1] and again.pending == [2]
        with pytest.raises(LedgerRefusal, match=r"already released at cut 20.*Keep --cut 20") as info:
            ledger.plan_release(keys, 40, "ambient", SERVER, paths=["0/0.png", "0/1.png", "0/2.png"])
        assert "0/0.png" in str(info.value)
        # The refusal changed nothing.
        assert ledger.seed_for(keys[0]) == plan.seeds[0]
        assert len(ledger.releases()) == 2


def test_refuses_after_forget_until_reset_and_reset_draws_fresh_noise_for_a_new_cut(tmp_path):
    with Ledger(tmp_path) as ledger:
        key = ledger.image_key("0/a.png", b"a")
        plan = ledger.plan_release([key], 20, "ambient", SERVER)
        _record(ledger, [key], plan.seeds, 20)
        ledger.record_forget(SERVER, 1)
        with pytest.raises(LedgerRefusal, match="forget"):
            ledger.plan_release([key], 20, "ambient", SERVER)
        # A new image was never released: it may go after a forget.
        fresh = ledger.image_key("0/b.png", b"b")
        assert ledger.plan_release([fresh], 20, "ambient", SERVER).pending == [0]
        ledger.reset()
        assert ledger.fingerprint == ""
        same_cut = ledger.plan_release([key], 20, "ambient", SERVER)
        assert same_cut.pending == [0] and same_cut.seeds == plan.seeds  # identical bytes again
        other_cut = ledger.plan_release([key], 40, "ambient", SERVER)
        assert other_cut.seeds != plan.seeds  # never the same noise at two cuts
        # History is kept for the audit.
        assert [e["kind"] for e in ledger.events()] == ["forget", "reset"]
        assert len(ledger.releases(key)) == 1


def test_unacknowledged_upload_at_another_cut_never_reuses_its_noise(tmp_path):
    with Ledger(tmp_path) as ledger:
        key = ledger.image_key("0/a.png", b"a")
        first = ledger.plan_release([key], 20, "ambient", SERVER).seeds[0]
        # No ack recorded (the upload may still have reached the server); the user changes --cut.
        second = ledger.plan_release([key], 40, "ambient", SERVER).seeds[0]
        assert second != first
        assert ledger.plan_release([key], 40, "ambient", SERVER).seeds[0] == second


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
