"""The release ledger: what left this client, when, at which noise level, and the noise it used.

One SQLite file in the workdir (transactions make every change all-or-nothing and
durable). It holds

- the client secret (random, created once; it keys the image HMACs and the noise seeds and
  never leaves) and the client id;
- per image: ``image_key = HMAC-SHA256(secret, 8-bit pixels as released)`` (client/image_identity.py:
  an image is its pixels, so a renamed or re-encoded copy has the same key; the server sees
  this opaque key, never a file name) and its perceptual hash (near-duplicates);
- every release, written as ``sent`` *before* its bytes go and marked ``acked`` after the
  server's ack (time, server, cut, alpha_bar, protocol, label, seed, SHA-256 of the bytes);
- forget / reset events, the server fingerprint last joined, and the pinned schedule with the
  client's noise floor (client/noise_floor.py).

Why the rules: a release x_cut = sqrt(ab) x0 + sqrt(1-ab) eps is a Gaussian mechanism.
Sending the *same* bytes twice discloses nothing new; fresh noise at the same level lets a
server average copies; the same noise at *another* level gives two equations in x0 and eps
(the server solves for x0 exactly). So the noise seed is derived from the image's content
and its level alpha_bar: the same image at the same level always gets the same bytes, at
another level independent noise. Releasing an image at a second level, or again after a
forget, needs ``--re-release-confirm`` and is counted. Releases are history: neither
``forget`` (the server may keep what it got) nor ``reset`` removes or discounts them, and
a release that was sent but never acknowledged counts as released.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from collafuse.client.errors import FRESH_WORKDIR_RISK, ClientError, LedgerRefusal
from collafuse.client.image_identity import Copy, ImageIdentity, perceptual_hash, pixel_message
from collafuse.common.schedule import ScheduleConfig

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"
SCHEMA_VERSION = "2"
_SEED_BITS = 63  # torch.Generator.manual_seed takes a signed 64-bit value

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    image_key TEXT PRIMARY KEY,
    phash TEXT NOT NULL,
    path TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    seq INTEGER PRIMARY KEY,
    image_key TEXT NOT NULL REFERENCES images(image_key),
    time REAL NOT NULL,
    server TEXT NOT NULL,
    cut INTEGER NOT NULL,
    alpha_bar REAL NOT NULL,
    protocol TEXT NOT NULL,
    label INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sent', 'acked')),
    acked REAL,
    re_release INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS releases_by_image ON releases(image_key);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    server TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
_RELEASE_COLUMNS = "seq, image_key, time, server, cut, alpha_bar, protocol, label, seed, payload_sha256, status, re_release"


@dataclass(frozen=True)
class ReleaseLevel:
    """The noise level of a release: the cut, and what it means, alpha_bar at the cut of the schedule used."""

    cut: int
    alpha_bar: float

    @classmethod
    def of(cls, schedule: ScheduleConfig, cut: int) -> ReleaseLevel:
        return cls(cut, float(schedule.alphas_cumprod()[cut]))

    def describe(self) -> str:
        return f"cut {self.cut} (alpha_bar {self.alpha_bar:.4g}, noise std {(1 - self.alpha_bar) ** 0.5:.3f})"


@dataclass(frozen=True)
class ReleaseRecord:
    seq: int
    image_key: str
    time: float
    server: str
    cut: int
    alpha_bar: float
    protocol: str
    label: int
    seed: int
    payload_sha256: str
    status: str  # 'sent' (no ack seen: counts as released) or 'acked'
    re_release: int  # 1: sent again under --re-release-confirm


@dataclass
class ReleasePlan:
    """Which images to send now (indices into the caller's list, with their seeds) and which to skip."""

    pending: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    re_release: list[bool] = field(default_factory=list)  # per pending image: a confirmed second release
    already_released: list[int] = field(default_factory=list)
    copies: dict[int, Copy] = field(default_factory=dict)


@dataclass(frozen=True)
class SentItem:
    image_key: str
    label: int
    seed: int
    payload_sha256: str
    re_release: bool = False


@dataclass(frozen=True)
class PinnedSchedule:
    """The schedule first accepted (trust on first use) and the noise floor: the most alpha_bar a release may have."""

    config_json: str
    digest: str  # the schedule config's sha256 (ScheduleConfig.config_digest)
    floor_alpha_bar: float
    floor_origin: str


@dataclass(frozen=True)
class FloorConfig:
    """The client's own word on its noise floor (client/noise_floor.py): its reference schedule (the floor is
    alpha_bar at --cut under it) and, when stated, --max-release-alpha-bar, which replaces that."""

    reference: ScheduleConfig
    max_alpha_bar: float | None = None

    def describe(self) -> str:
        r = self.reference
        stated = f", --max-release-alpha-bar {self.max_alpha_bar:g}" if self.max_alpha_bar is not None else ""
        return f"reference T={r.num_train_timesteps} {r.beta_schedule} {r.beta_start:g}..{r.beta_end:g}{stated}"


class Ledger:
    """The persistent release ledger of one client workdir."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            with self._transaction():
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._meta_default("schema", SCHEMA_VERSION)
            if fresh:
                # The file holds the HMAC secret: keep it private to the user.
                os.chmod(self.path, 0o600)
            version = self._meta("schema")
            if version != SCHEMA_VERSION:
                self._db.close()
                raise ClientError(
                    f"the ledger {self.path} has schema {version}; this client reads {SCHEMA_VERSION} (images keyed "
                    "by their pixels, seeds bound to the noise level). Its history cannot be converted: keep the "
                    f"file as the record of what was released. {FRESH_WORKDIR_RISK}"
                )
            self._db.executescript(_SCHEMA)
            with self._transaction():
                self._meta_default("secret", secrets.token_hex(32))
                self._meta_default("seq", "0")
        except sqlite3.DatabaseError as exc:
            raise ClientError(
                f"the release ledger {self.path} cannot be read ({exc}). It holds the record of what was "
                f"released: restore it from a backup rather than deleting it. {FRESH_WORKDIR_RISK}"
            ) from exc
        self._secret = bytes.fromhex(self._meta("secret") or "")

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: no half-applied change survives an error or crash.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def _meta_default(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _next_seq(self) -> int:
        # One sequence over releases and events, so "released before that forget" is well defined.
        seq = int(self._meta("seq") or 0) + 1
        self._set_meta("seq", str(seq))
        return seq

    def _event(self, kind: str, server: str, detail: str) -> None:
        self._db.execute(
            "INSERT INTO events(seq, time, kind, server, detail) VALUES (?, ?, ?, ?, ?)",
            (self._next_seq(), time.time(), kind, server, detail),
        )

    def _hmac(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    # -- identity ---------------------------------------------------------------------------------

    def client_id(self, requested: str | None = None) -> str:
        """The workdir's client id: created once (random) or taken from ``requested`` the first time."""
        with self._transaction():
            current = self._meta("client_id")
            if current is None:
                current = requested or f"client-{secrets.token_hex(6)}"
                self._set_meta("client_id", current)
        if requested and requested != current:
            raise LedgerRefusal(
                f"this workdir ({self.path.parent}) belongs to client {current!r}, not {requested!r}; "
                f"pass --client-id {current} (or leave it out). A workdir per client id: another --workdir is "
                "another client, with a ledger that knows nothing of this one's releases"
            )
        return current

    def image_keys(self, images: torch.Tensor) -> list[str]:
        """HMAC-SHA256(secret, 8-bit pixels) of each (C, H, W) image as released: stable per image, meaningless
        to the server, and the same for every copy of the same pixels whatever its file."""
        return [self._hmac(b"image\0" + pixel_message(image)).hex() for image in images]

    def identify(self, images: torch.Tensor, paths: Sequence[str] | None = None) -> list[ImageIdentity]:
        """Key, perceptual hash and path of each image (the pixels that are released, never the file)."""
        keys = self.image_keys(images)
        hashes = perceptual_hash(images)
        return [ImageIdentity(k, h, paths[i] if paths else None) for i, (k, h) in enumerate(zip(keys, hashes))]

    def noise_seed(self, key: str, level: ReleaseLevel) -> int:
        """The seed of eps_c for an image at a level: bound to its content (the key) and to alpha_bar, so the same
        image at the same level always has the same noise, and at any other level independent noise."""
        message = f"noise\0{key}\0{level.alpha_bar.hex()}".encode()
        return int.from_bytes(self._hmac(message)[:8], "big") >> (64 - _SEED_BITS)

    # -- server fingerprint and the pinned schedule -------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self._meta("fingerprint") or ""

    def set_fingerprint(self, fingerprint: str, server: str) -> None:
        with self._transaction():
            self._set_meta("fingerprint", fingerprint)
            self._set_meta("fingerprint_server", server)

    def pinned_schedule(self) -> PinnedSchedule | None:
        config = self._meta("schedule_json")
        if config is None:
            return None
        return PinnedSchedule(
            config, self._meta("schedule_fingerprint") or "", float(self._meta("floor_alpha_bar") or "nan"),
            self._meta("floor_origin") or "",
        )

    def pin_schedule(self, schedule: ScheduleConfig, floor_alpha_bar: float, origin: str, server: str) -> None:
        """Keep ``schedule`` as the one first accepted and ``floor_alpha_bar`` as the noise floor (once: later calls
        change nothing)."""
        with self._transaction():
            if self._meta("schedule_json") is not None:
                return
            self._set_meta("schedule_json", schedule.config_json())
            self._set_meta("schedule_fingerprint", schedule.config_digest())
            self._set_meta("floor_alpha_bar", repr(floor_alpha_bar))
            self._set_meta("floor_origin", origin)
            self._event("pin", server, f"schedule {schedule.config_digest()[:12]}, floor alpha_bar {floor_alpha_bar!r} ({origin})")

    def set_floor(self, floor_alpha_bar: float, origin: str, server: str) -> None:
        """Change the noise floor (the user said so with --max-release-alpha-bar); recorded as an event."""
        with self._transaction():
            old = self._meta("floor_alpha_bar")
            self._set_meta("floor_alpha_bar", repr(floor_alpha_bar))
            self._set_meta("floor_origin", origin)
            self._event("floor", server, f"floor alpha_bar {old} -> {floor_alpha_bar!r} ({origin})")

    def record_schedule_change(self, schedule: ScheduleConfig, server: str, detail: str) -> None:
        with self._transaction():
            self._event("schedule", server, f"accepted schedule {schedule.config_digest()[:12]}: {detail}")

    def floor_config(self) -> FloorConfig:
        """The client's own floor settings as last joined with (the defaults before any join)."""
        reference = self._meta("reference_schedule_json")
        stated = self._meta("max_release_alpha_bar")
        return FloorConfig(
            ScheduleConfig.model_validate_json(reference) if reference else ScheduleConfig(),
            float(stated) if stated else None,
        )

    def set_floor_config(self, config: FloorConfig, server: str) -> None:
        """Keep the reference schedule and the stated floor (--max-release-alpha-bar, None: not given) this client
        joins with; every change is an event."""
        with self._transaction():
            old = self.floor_config()
            self._set_meta("reference_schedule_json", config.reference.model_dump_json())
            self._set_meta("max_release_alpha_bar", "" if config.max_alpha_bar is None else repr(config.max_alpha_bar))
            if old != config:
                self._event("floor", server, f"floor settings {old.describe()} -> {config.describe()}")

    def look_gain(self, image_shape: Sequence[int] | None = None) -> float | None:
        """The look gain (client/local_data.py::LookGain) of the spec last joined, if it is ``image_shape`` (None: any)."""
        shape, gain = self._meta("look_gain_shape"), self._meta("look_gain")
        if shape is None or gain is None:
            return None
        if image_shape is not None and shape != "x".join(map(str, image_shape)):
            return None
        return float(gain)

    def set_look_gain(self, image_shape: Sequence[int], gain: float, server: str, detail: str) -> None:
        with self._transaction():
            shape = "x".join(map(str, image_shape))
            if (self._meta("look_gain_shape"), self._meta("look_gain")) != (shape, repr(gain)):
                self._event("spec", server, f"served {shape}, look gain {gain:.4g}: {detail}")
            self._set_meta("look_gain_shape", shape)
            self._set_meta("look_gain", repr(gain))

    # -- releases ---------------------------------------------------------------------------------

    def released_hashes(self) -> dict[str, int]:
        """Perceptual hash of every image that was ever sent (any server, level or status)."""
        rows = self._db.execute(
            "SELECT DISTINCT images.image_key, images.phash FROM releases JOIN images USING (image_key)"
        ).fetchall()
        return {str(k): int(h, 16) for k, h in rows}

    def _last_forget(self, server: str) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events WHERE kind = 'forget' AND server = ?", (server,)).fetchone()
        return int(row[0] or 0)

    def plan_release(
        self,
        ids: Sequence[ImageIdentity],
        level: ReleaseLevel,
        server: str,
        *,
        copies: Mapping[int, Copy] | None = None,
        resend: bool = False,
        re_release: bool = False,
    ) -> ReleasePlan:
        """Decide per image: send (with its seed), skip (already released to this server at this level, or a copy
        of another image), or refuse.

        Sent-but-unacknowledged releases at this level are sent again (identical bytes). ``resend`` sends
        acknowledged ones again too (e.g. the server lost its store). A release at a second level, or again
        after a forget, is refused unless ``re_release`` (--re-release-confirm): LedgerRefusal, nothing changed.
        """
        plan = ReleasePlan(copies=dict(copies or {}))
        other_level: dict[int, set[tuple[int, float]]] = {}
        forgotten: list[int] = []
        with self._transaction():
            forget_seq = self._last_forget(server)
            for i, ident in enumerate(ids):
                self._db.execute(
                    "INSERT INTO images(image_key, phash, path, created) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(image_key) DO UPDATE SET path = COALESCE(excluded.path, images.path)",
                    (ident.key, f"{ident.phash:016x}", ident.path, time.time()),
                )
                if i in plan.copies:
                    continue
                rows = self._db.execute(
                    "SELECT seq, server, cut, alpha_bar, status FROM releases WHERE image_key = ?", (ident.key,)
                ).fetchall()
                here = [r for r in rows if r[3] == level.alpha_bar and r[1] == server]
                live = [r for r in here if int(r[0]) > forget_seq]
                confirmed = False
                if live:
                    if not resend and any(r[4] == "acked" for r in live):
                        plan.already_released.append(i)
                        continue
                elif here:
                    forgotten.append(i)
                    confirmed = True
                elif rows and not any(r[3] == level.alpha_bar for r in rows):
                    other_level[i] = {(int(r[2]), float(r[3])) for r in rows}
                    confirmed = True
                plan.pending.append(i)
                plan.seeds.append(self.noise_seed(ident.key, level))
                plan.re_release.append(confirmed)
            if (other_level or forgotten) and not re_release:
                raise LedgerRefusal(self._refusal(ids, level, other_level, forgotten))
        if other_level or forgotten:
            log.warning(
                "--re-release-confirm: releasing %d image(s) again (%d at a new level, with independent noise; %d after "
                "a forget, with the same bytes as before); the ledger counts each",
                len(other_level) + len(forgotten), len(other_level), len(forgotten),
            )
        return plan

    @staticmethod
    def _refusal(
        ids: Sequence[ImageIdentity],
        level: ReleaseLevel,
        other_level: Mapping[int, set[tuple[int, float]]],
        forgotten: Sequence[int],
    ) -> str:
        parts = []
        if other_level:
            previous = sorted({p for levels in other_level.values() for p in levels})
            shown = ", ".join(f"cut {c} (alpha_bar {a:.4g})" for c, a in previous)
            parts.append(
                f"{len(other_level)} image(s){_examples(list(other_level), ids)} were already released at {shown}; "
                f"releasing them at {level.describe()} too discloses more about each (two noisy copies). Keep "
                f"--cut {previous[0][0]} at the same schedule"
            )
        if forgotten:
            parts.append(
                f"{len(forgotten)} image(s){_examples(forgotten, ids)} were released before you asked the server to "
                "forget them: sending them again would undo that"
            )
        return (
            "refusing to release: " + "; ".join(parts) + ". Releases outlive `forget` and `reset`. Pass "
            "--re-release-confirm to accept the extra disclosure (counted in the ledger)."
        )

    def record_sent(self, items: Sequence[SentItem], level: ReleaseLevel, protocol: str, server: str) -> list[int]:
        """Record releases as sent, *before* their bytes go (a send whose ack never comes counts as a release);
        returns the records to ``mark_acked`` after the server's ack. Resending identical bytes to the same
        server reuses the record."""
        seqs = []
        now = time.time()
        with self._transaction():
            forget_seq = self._last_forget(server)
            for item in items:
                row = self._db.execute(
                    "SELECT MAX(seq) FROM releases WHERE image_key = ? AND server = ? AND payload_sha256 = ? AND seq > ?",
                    (item.image_key, server, item.payload_sha256, forget_seq),
                ).fetchone()
                if row[0] is not None:
                    seqs.append(int(row[0]))
                    continue
                seq = self._next_seq()
                self._db.execute(
                    f"INSERT INTO releases({_RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'sent', ?)",
                    (seq, item.image_key, now, server, level.cut, level.alpha_bar, protocol, item.label, item.seed,
                     item.payload_sha256, int(item.re_release)),
                )
                seqs.append(seq)
        return seqs

    def mark_acked(self, seqs: Sequence[int]) -> None:
        """The server acknowledged these releases (call only after its ack)."""
        now = time.time()
        with self._transaction():
            self._db.executemany("UPDATE releases SET status = 'acked', acked = ? WHERE seq = ?", [(now, s) for s in seqs])

    def record_forget(self, server: str, removed: int) -> None:
        with self._transaction():
            self._event("forget", server, f"server removed {removed} releases (releases stay in this ledger)")

    def reset(self, reason: str = "user reset") -> None:
        """Forget the server fingerprint, so the client can join a server whose setup changed.

        Releases, the pinned schedule and the noise floor stay: a reset never makes a second release
        of an image possible (that takes --re-release-confirm) nor lowers the floor.
        """
        with self._transaction():
            self._event("reset", "", reason)
            self._db.execute("DELETE FROM meta WHERE key IN ('fingerprint', 'fingerprint_server')")

    # -- queries ----------------------------------------------------------------------------------

    def releases(self, key: str | None = None) -> list[ReleaseRecord]:
        """Every release (of one image, or all), sent or acknowledged, oldest first."""
        sql = f"SELECT {_RELEASE_COLUMNS} FROM releases"
        rows = (
            self._db.execute(sql + " WHERE image_key = ? ORDER BY seq", (key,)).fetchall()
            if key is not None
            else self._db.execute(sql + " ORDER BY seq").fetchall()
        )
        return [ReleaseRecord(*row) for row in rows]

    def release_counts(self) -> dict[str, int]:
        """Releases per image key, sent or acknowledged (images never released are absent)."""
        rows = self._db.execute("SELECT image_key, COUNT(*) FROM releases GROUP BY image_key").fetchall()
        return {str(k): int(n) for k, n in rows}

    def events(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT seq, time, kind, server, detail FROM events ORDER BY seq").fetchall()
        return [dict(zip(("seq", "time", "kind", "server", "detail"), row)) for row in rows]

    def summary(self) -> dict[str, Any]:
        """Counts for people and metrics: images known, released, releases per cut, most per image, the floor."""
        one = self._db.execute
        images = int(one("SELECT COUNT(*) FROM images").fetchone()[0])
        counts = self.release_counts()
        per_cut = dict(one("SELECT cut, COUNT(*) FROM releases GROUP BY cut ORDER BY cut").fetchall())
        levels = one("SELECT MAX(n) FROM (SELECT COUNT(DISTINCT alpha_bar) AS n FROM releases GROUP BY image_key)").fetchone()
        kinds = [e["kind"] for e in self.events()]
        pinned = self.pinned_schedule()
        return {
            "client_id": self._meta("client_id"),
            "images": images,
            "released_images": len(counts),
            "releases": sum(counts.values()),
            "sent_unacknowledged": int(one("SELECT COUNT(*) FROM releases WHERE status = 'sent'").fetchone()[0]),
            "re_releases": int(one("SELECT COUNT(*) FROM releases WHERE re_release = 1").fetchone()[0]),
            "releases_per_cut": {str(k): int(v) for k, v in per_cut.items()},
            "max_releases_per_image": max(counts.values(), default=0),
            "max_levels_per_image": int(levels[0] or 0),
            "forgets": kinds.count("forget"),
            "resets": kinds.count("reset"),
            "fingerprint": self.fingerprint,
            "schedule_fingerprint": pinned.digest if pinned else "",
            "floor_alpha_bar": pinned.floor_alpha_bar if pinned else None,
            "floor_settings": self.floor_config().describe(),
            "look_gain": self.look_gain(),
        }


def _examples(indices: Sequence[int], ids: Sequence[ImageIdentity], limit: int = 3) -> str:
    shown = ", ".join(ids[i].name() for i in list(indices)[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f" ({shown}{more})"
