"""``collafuse-audit RUN_DIR``: audit a recorded run (the server's transcript plus the clients' data).

Reads, relative to RUN_DIR (the layout of ``collafuse-sim --transcript``; each path can be overridden):

    server/transcript.jsonl          every request the server read (server --transcript)
    server/checkpoints/latest/ema    the server's model (attacks with a model are skipped without it)
    data/shards/<client-id>/         each client's images (the truth the attacks are scored against)
    clients/<client-id>/             each client's ledger (image keys, the pinned schedule and noise floor)
                                     and metrics.json (its release report: refused copies, DP settings)

Both protocols: ambient releases are audited per (client, cut) (``core.audit_group``), split steps per
client (``split.audit_split``: the real gradient inversion on the recorded x_t, eps_hat and gradients, and the
rows of one image linked across steps and combined). What reached the server is attacked as a whole: every
copy of an image a client released (the same image again, flipped, rotated or shifted copies) is aligned and
averaged (``copies``), and when the served spec is larger than the client's images every attack is also taken
back to the native pixels by least squares (``native``). The noise check holds every payload against the
client's own floor (its reference schedule, its look gain: ``floor``), read from its ledger or, without one,
from ``--reference-*`` / ``--max-release-alpha-bar``; the attacks undo the level of the schedule the payloads
were noised under (the one the client pinned, else the server model's).

Writes RUN_DIR/audit.json, RUN_DIR/audit.png (PSNR per attack per cut) and RUN_DIR/audit_grid.png
(x0, the payload, and the best reconstructions).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from collafuse.client.ledger import FloorConfig
from collafuse.common.config import ClientSettings
from collafuse.common.data import DataError, load_image_folder
from collafuse.common.diffusion import Denoiser
from collafuse.common.images import save_grid
from collafuse.common.models import as_denoiser, load_model
from collafuse.common.runtime import run_cli, setup_logging
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.audit.attacks import Reconstruction
from collafuse.evaluation.audit.copies import aligned_average
from collafuse.evaluation.audit.core import AuditConfig, audit_group
from collafuse.evaluation.audit.disclosure import (
    PixelFeatures,
    disclosure,
    inception_features,
    server_side_images,
)
from collafuse.evaluation.audit.floor import client_floor_at, served_gain
from collafuse.evaluation.audit.latent import (
    LatentAudit,
    LatentAuditError,
    announced_identity,
    run_autoencoder_path,
)
from collafuse.evaluation.audit.native import native_images, native_shapes
from collafuse.evaluation.audit.payloads import match_to_originals
from collafuse.evaluation.audit.space import AuditSpace, LatentSpace, PixelSpace, scoring_in
from collafuse.evaluation.audit.split import DpParams, audit_split, ledger_index
from collafuse.evaluation.audit.transcript import (
    ReleasePayload,
    SplitPayload,
    TranscriptError,
    read_transcript,
    release_payloads,
    split_payloads,
    unexpected_tensors,
)
from collafuse.evaluation.metrics.features import FeatureExtractor

log = logging.getLogger("collafuse.audit")


class AuditError(ValueError):
    """The run folder lacks what the audit needs; the message says what to pass."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collafuse-audit", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run folder (collafuse-sim --out with --transcript)")
    p.add_argument("--transcript", type=Path, help="default: RUN_DIR/server/transcript.jsonl")
    p.add_argument("--model", type=Path, help="the server's model folder; default: RUN_DIR/server/checkpoints/latest/ema")
    p.add_argument("--data", action="append", default=[], metavar="CLIENT=PATH",
                   help="a client's image folder (repeatable); default: RUN_DIR/data/shards/<client>")
    p.add_argument("--max-images", type=int, default=64, help="images audited per client and cut")
    p.add_argument("--max-copy-search", type=int, default=2048,
                   help="releases of a client searched for copies of the audited ones (all pairs: quadratic)")
    p.add_argument("--chain-steps", type=int, default=0, help="steps of the chain attacks (0: every step from the cut)")
    p.add_argument("--chains", nargs="*", default=["ddim", "ddpm"], choices=["ddim", "ddpm"])
    p.add_argument("--dp-noise", type=float, nargs="*", default=[0.5, 2.0], help="sigma of the simulated DP split step")
    p.add_argument("--dp-clip", type=float, default=None, help="C of the simulated DP split step (default: median norm)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--features", choices=["inception", "pixels", "none"], default="inception",
                   help="features of the disclosure Fréchet distance (none: skip it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoencoder", type=Path, default=None,
                   help="a run in latent space: the autoencoder folder it ran with (default: the one RUN_DIR/metrics.json "
                        "names); every estimate is decoded through it and scored against x0 in pixels")
    defaults = ClientSettings.model_fields
    floor = p.add_argument_group("the client's floor, for clients without a ledger (defaults: the client's)")
    floor.add_argument("--reference-timesteps", type=int, default=defaults["reference_timesteps"].default)
    floor.add_argument("--reference-beta-start", type=float, default=defaults["reference_beta_start"].default)
    floor.add_argument("--reference-beta-end", type=float, default=defaults["reference_beta_end"].default)
    floor.add_argument("--reference-beta-schedule", default=defaults["reference_beta_schedule"].default)
    floor.add_argument("--max-release-alpha-bar", type=float, default=None)
    p.add_argument("--no-linking", dest="link", action="store_false",
                   help="split: do not combine the rows of one image across steps (per-row attacks only)")
    p.add_argument("--log-level", default="INFO")
    return p


def _floor_config(args: argparse.Namespace) -> FloorConfig:
    """The floor settings of a client whose ledger the audit does not have."""
    try:
        reference = ScheduleConfig(num_train_timesteps=args.reference_timesteps, beta_start=args.reference_beta_start,
                                   beta_end=args.reference_beta_end, beta_schedule=args.reference_beta_schedule)
    except ValueError as exc:
        raise AuditError(f"--reference-*: the reference schedule is unusable: {exc}") from None
    return FloorConfig(reference, args.max_release_alpha_bar)


def _data_paths(args: argparse.Namespace, clients: list[str]) -> dict[str, Path]:
    given: dict[str, Path] = {}
    for spec in args.data:
        name, sep, path = spec.partition("=")
        if not sep:
            raise AuditError(f"--data {spec!r}: write CLIENT=PATH, e.g. --data client-0=runs/sim/data/shards/client-0")
        given[name] = Path(path)
    return {c: given.get(c, args.run_dir / "data" / "shards" / c) for c in clients}


def _load_server(path: Path) -> tuple[Denoiser | None, ScheduleConfig | None, str]:
    if not (path / "config.json").is_file():
        log.warning("no server model at %s: attacks that need the server's model are skipped (pass --model)", path)
        return None, None, "absent"
    model, meta = load_model(path)
    schedule = ScheduleConfig(**meta["schedule"]) if "schedule" in meta else None
    return as_denoiser(model), schedule, str(path)


def _match(payloads: list[ReleasePayload], client_dir: Path, pixels: torch.Tensor, x0: torch.Tensor) -> list[int]:
    """Index into the client's images of each payload: through its ledger's keys (of the images' ``pixels``), else by
    correlation with ``x0`` (what the payloads noise: the pixels, or their latents)."""
    from collafuse.client.ledger import LEDGER_FILE, Ledger

    if (client_dir / LEDGER_FILE).is_file():
        with Ledger(client_dir) as ledger:
            index = {key: i for i, key in enumerate(ledger.image_keys(pixels))}
        found = [index.get(p.image_key, -1) for p in payloads]
        if all(i >= 0 for i in found):
            return found
        log.warning("%d payloads have keys the ledger of %s does not know: matching by correlation",
                    sum(i < 0 for i in found), client_dir)
    stacked = torch.stack([p.x_cut for p in payloads])
    return match_to_originals(stacked, x0).tolist()


def _figure(path: Path, groups: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for group in groups:
        for attack in group["attacks"]:
            name = f"{group.get('protocol', 'ambient')}: {attack['attack']}" + (" (sim)" if attack["simulated"] else "")
            series[name].append((group["cut"], min(attack["psnr_db"], 150.0)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                linestyle="--" if name.startswith(("average", "two_level")) or name.endswith("(sim)") else "-")
    ax.set_xlabel("cut ζ")
    ax.set_ylabel("PSNR of the reconstruction vs x0 (dB, capped at 150)")
    ax.set_title("What a curious server reconstructs (dashed: simulated misbehaviour)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class ClientImages:
    """A client's images as the audit holds them: ``data.images`` is what the payloads noise (pixels, or their
    latents), ``pixels`` what the ledger keys and the scores compare; ``space`` how estimates are scored."""

    shard: Path
    data: Any
    pixels: torch.Tensor
    native_shapes: list[tuple[int, int, int]]
    space: AuditSpace


@dataclass
class ClientRecords:
    """What the audit reads from a client's workdir: the schedule it pinned, its floor, its own report."""

    schedule: ScheduleConfig | None = None
    floor_alpha_bar: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, client_dir: Path) -> ClientRecords:
        from collafuse.client.ledger import LEDGER_FILE, Ledger

        out = cls()
        if (client_dir / "metrics.json").is_file():
            out.metrics = json.loads((client_dir / "metrics.json").read_text())
        if (client_dir / LEDGER_FILE).is_file():
            with Ledger(client_dir) as ledger:
                pinned = ledger.pinned_schedule()
                out.ledger = ledger.summary()
            if pinned is not None:
                out.schedule = ScheduleConfig.from_wire(pinned.config_json, pinned.digest)
                out.floor_alpha_bar = pinned.floor_alpha_bar
        return out

    def dp(self) -> DpParams:
        release = self.metrics.get("contribution") or {}
        return DpParams(release.get("dp_clip"), float(release.get("dp_noise_multiplier") or 0.0))

    def refusals(self) -> dict[str, Any]:
        """The client's own record of what its guard kept back (client/protocols/ambient.py, client/ledger.py)."""
        release = self.metrics.get("contribution") or {}
        keys = ("copies", "already_released", "re_released", "sent")
        return {**{k: release.get(k) for k in keys},
                **{k: self.ledger.get(k) for k in ("max_releases_per_image", "max_levels_per_image", "re_releases",
                                                    "resets", "forgets")}}


def audit_run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir} is not a folder: pass a run folder (collafuse-sim --out)")
    transcript = args.transcript or run_dir / "server" / "transcript.jsonl"
    entries = read_transcript(transcript)
    payloads = release_payloads(entries)
    steps, split_counts = split_payloads(entries)
    if not payloads and not steps:
        raise AuditError(f"{transcript} holds no Release payloads and no complete split steps: nothing to audit")
    denoiser, model_schedule, model_path = _load_server(args.model or run_dir / "server" / "checkpoints" / "latest" / "ema")
    config = AuditConfig(chains=args.chains, chain_steps=args.chain_steps, dp_noise=args.dp_noise,
                         dp_clip=args.dp_clip, delta=args.delta, seed=args.seed)
    fallback_floor = _floor_config(args)
    by_group: dict[tuple[str, int], list[ReleasePayload]] = defaultdict(list)
    by_key: dict[tuple[str, str], list[ReleasePayload]] = defaultdict(list)
    for p in payloads:
        by_group[(p.client_id, p.cut)].append(p)
        by_key[(p.client_id, p.image_key)].append(p)
    split_by_client: dict[str, list[SplitPayload]] = defaultdict(list)
    for step in steps:
        split_by_client[step.client_id].append(step)
    repeated = {f"{c}/{k[:12]}": sorted({p.cut for p in ps}) for (c, k), ps in by_key.items() if len(ps) > 1}
    client_ids = sorted({c for c, _ in by_group} | set(split_by_client))
    shards = _data_paths(args, client_ids)
    records = {c: ClientRecords.read(run_dir / "clients" / c) for c in client_ids}
    first = payloads[0].x_cut if payloads else steps[0].x_t[0]
    channels, height, width = first.shape
    image_shape = (int(channels), int(height), int(width))
    announced = {c: i for c in client_ids if (i := announced_identity(run_dir / "clients" / c)) is not None}
    latent: LatentAudit | None = None
    if announced:
        try:
            latent = LatentAudit.open(args.autoencoder or run_autoencoder_path(run_dir), announced, image_shape)
        except LatentAuditError as exc:
            raise AuditError(str(exc)) from None
    shown_shape = latent.pixel_shape if latent is not None else image_shape  # what x0 and the pictures are in
    extractor: FeatureExtractor | None = None
    if args.features == "pixels":
        extractor = PixelFeatures(shown_shape)
    elif args.features == "inception":
        extractor = inception_features()
    if model_schedule is None and not any(r.schedule for r in records.values()):
        log.warning("no schedule recorded with the model or in a client's ledger: assuming the default %s",
                    ScheduleConfig().model_dump())

    def release_schedule(client: str) -> tuple[ScheduleConfig, str]:
        """The schedule the payloads were noised under: the one the client pinned in its ledger (what it used), else
        the server's (its model's)."""
        if records[client].schedule is not None:
            return records[client].schedule, "client ledger (pinned)"  # type: ignore[return-value]
        if model_schedule is not None:
            return model_schedule, "server model"
        return ScheduleConfig(), "default (no model, no ledger)"

    def load(client: str) -> ClientImages:
        shard = shards[client]
        if not shard.is_dir():
            raise AuditError(f"no images for {client} at {shard}: pass --data {client}=PATH")
        try:
            if latent is not None:
                # The native view does not apply: the payloads are latents of the images at the autoencoder's spec.
                view = latent.load(shard)
                return ClientImages(shard, view.data, view.pixels, [], view.space)
            data = load_image_folder(shard, image_shape[0], image_shape[1])
            return ClientImages(shard, data, data.images, native_shapes(shard, data.paths, image_shape[0]),
                                PixelSpace())
        except (DataError, LatentAuditError) as exc:
            raise AuditError(f"cannot load {client}'s images from {shard}: {exc}") from exc

    def as_images(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Payload-space tensors (latents in a latent run) as the images they show."""
        return latent.decoded(tensors) if latent is not None else tensors

    def floor_of(client: str, cut: int, shapes: list[tuple[int, int, int]], served: torch.Tensor) -> Any:
        if latent is not None:
            gain, origin = 1.0, "latent space: the floor applies per scaled latent element"
        else:
            gain, origin = served_gain(shapes, image_shape, served)
        return client_floor_at(run_dir / "clients" / client, cut, image_shape, gain, origin, fallback_floor)

    groups: list[dict[str, Any]] = []
    grid_rows: list[torch.Tensor] = []
    grid_titles: list[str] = []
    clients_released = sorted({c for c, _ in by_group})
    for client in tqdm(clients_released, desc="audit releases", unit="client"):
        view = load(client)
        shard, data, shapes = view.shard, view.data, view.native_shapes
        with scoring_in(view.space):
            mine = records[client]
            schedule, schedule_source = release_schedule(client)
            ab = schedule.alphas_cumprod()
            T = schedule.num_train_timesteps
            cuts = sorted(cut for c, cut in by_group if c == client)
            released = {cut: by_group[(client, cut)] for cut in cuts}
            audited = {cut: group[: args.max_images] for cut, group in released.items()}
            every = {cut: _match(group, run_dir / "clients" / client, view.pixels, data.images)
                     for cut, group in released.items()}
            index = {cut: every[cut][: args.max_images] for cut in cuts}
            # Every copy of an audited image that reached the server, among all of this client's releases (the audited
            # ones first, then the others, up to --max-copy-search).
            rows = [(cut, k) for cut in cuts if 0 < cut < T for k in range(len(audited[cut]))]
            rows += [(cut, k) for cut in cuts if 0 < cut < T for k in range(len(audited[cut]), len(released[cut]))]
            rows = rows[: max(args.max_copy_search, sum(len(g) for g in audited.values()))]
            copies = None
            if len(rows) > 1:
                copies = aligned_average(torch.stack([released[cut][k].x_cut for cut, k in rows]).float(),
                                         torch.tensor([float(ab[cut]) for cut, _ in rows], dtype=torch.float64),
                                         data.images[[every[cut][k] for cut, k in rows]].float())
            position = {row: i for i, row in enumerate(rows)}
            for cut in cuts:
                group = audited[cut]
                x0 = data.images[index[cut]].float()
                x_cut = torch.stack([p.x_cut for p in group]).float()
                labels = torch.tensor([p.label for p in group], dtype=torch.long)
                files = {data.paths[i]: (shard / data.paths[i]).read_bytes() for i in sorted(set(index[cut]))}
                wire = b"".join({p.seq: p.wire_bytes for p in group}.values())
                extra: dict[str, torch.Tensor] = {}
                info: dict[str, dict[str, Any]] = {}
                if copies is not None and copies.groups and 0 < cut < T:
                    mine_rows = [position[(cut, k)] for k in range(len(group))]
                    extra["copies_aligned_mean"] = copies.estimate[mine_rows]
                    info["copies_aligned_mean"] = {"max_looks": int(copies.looks[mine_rows].max())}
                    if copies.two_level is not None:
                        extra["two_level_actual"] = copies.two_level[mine_rows]
                floor = floor_of(client, cut, shapes, x0)
                native = native_images(shard, data.paths, shapes, index[cut], image_shape) if latent is None else None
                report, recs = audit_group(x0, x_cut, labels, cut, schedule, denoiser, config, wire, files,
                                           floor=floor, native=native, extra=extra, extra_info=info)
                report.update(protocol="ambient", client_id=client, floor_alpha_bar=floor.per_element,
                              schedule_source=schedule_source)
                report["copies"] = copies.summary() if copies is not None else {"groups": 0}
                report["averaging"] = {
                    "releases_of_one_image_seen_by_server": max(
                        (len(ps) for (c, _), ps in by_key.items() if c == client), default=0),
                    "client_guard": mine.refusals(),
                    "note": "the average_k* attacks are simulated (k fresh releases of every image); copies_aligned_mean "
                            "averages the copies that actually reached the server",
                }
                x0_image = view.pixels[index[cut]].float()
                if latent is not None:
                    report["latent"] = latent.describe()
                if extractor is not None:
                    sets = {"release": x_cut}
                    if denoiser is not None:
                        sets.update(server_side_images(denoiser, schedule, labels, cut, image_shape, seed=args.seed,
                                                       num_inference_steps=args.chain_steps or 100))
                    report["disclosure"] = {"features": extractor.name,
                                            "frechet": disclosure(extractor, x0_image, as_images(sets))}
                groups.append(report)
                best = sorted(recs, key=lambda r: -r.psnr_db)
                shown = [r for r in best if r.attack in {"tweedie", "chain_ddim", "linear", "copies_aligned_mean"}][:2] + [
                    r for r in best if r.attack.startswith("split_inversion")][:2]
                grid_rows += [x0_image[:8], as_images({"x": x_cut[:8]})["x"]] + [r.x0_hat[:8] for r in shown]
                grid_titles += [f"{client} x0", f"x_cut (ζ={cut})"] + [f"{r.attack} {r.psnr_db:.1f} dB" for r in shown]
                _log_group(report, recs)

    for client, mine_steps in tqdm(sorted(split_by_client.items()), desc="audit split steps", unit="client"):
        view = load(client)
        shard, data, shapes = view.shard, view.data, view.native_shapes
        with scoring_in(view.space):
            mine = records[client]
            schedule, schedule_source = release_schedule(client)
            cut = int(mine.metrics.get("cut", min(int(s.t.min()) for s in mine_steps) - 1))
            ab = schedule.alphas_cumprod()
            files = {path: (shard / path).read_bytes() for path in data.paths}
            floor = floor_of(client, cut, shapes, data.images)

            def native_of(index: Any, shard: Path = shard, data: Any = data, shapes: Any = shapes) -> Any:
                return native_images(shard, data.paths, shapes, list(index), image_shape)

            known = ledger_index(run_dir / "clients" / client, mine_steps, view.pixels)
            report, recs, x0 = audit_split(mine_steps, data.images.float(), cut, ab, mine.dp(), floor, files,
                                           native_of=native_of if latent is None else None, link=args.link,
                                           known_index=known)
            # x0: the truth per row, in payload space; the scores and the pictures are of images.
            x0_image = view.space.pixels_of(x0) if isinstance(view.space, LatentSpace) else x0
            if latent is not None:
                report["latent"] = latent.describe()
            contribution = mine.metrics.get("contribution") or {}
            report.update(client_id=client, schedule_source=schedule_source,
                          epsilon_spent=contribution.get("epsilon"), epsilon_unbounded=contribution.get("epsilon_unbounded"),
                          privacy=mine.metrics.get("privacy"))
            by_name = {r.attack: r for r in recs}
            low = torch.cat([s.t for s in mine_steps]) <= report["t"]["low_band_max"]
            order = torch.nonzero(low).flatten()[: args.max_images]
            if extractor is not None and len(order) >= 2:
                x_t = torch.cat([s.x_t for s in mine_steps])[order].float()
                labels = torch.cat([s.labels for s in mine_steps])[order]
                sets = {"x_t_low_band": x_t}
                if denoiser is not None:
                    sets.update(server_side_images(denoiser, schedule, labels, cut, image_shape, seed=args.seed,
                                                   num_inference_steps=args.chain_steps or 100))
                # The inversion's estimate is an image already (scores decode latent estimates).
                sets = {**as_images(sets), "split_inversion": by_name["split_inversion"].x0_hat[order]}
                report["disclosure"] = {"features": extractor.name, "frechet": disclosure(extractor, x0_image[order], sets)}
            groups.append(report)
            # The low-t rows show the most; when a short run drew none, show its first rows.
            show = order[:8] if len(order) else torch.arange(min(8, int(low.numel())))
            served = [r for r in recs[1:] if tuple(r.x0_hat.shape) == tuple(x0_image.shape)]
            x_t_shown = as_images({"x_t": torch.cat([s.x_t for s in mine_steps])[show].float()})["x_t"]
            grid_rows += [x0_image[show], x_t_shown] + [r.x0_hat[show] for r in served]
            grid_titles += [f"{client} x0 (split)", f"x_t (t <= {report['t']['low_band_max']})"] + [
                f"{r.attack} {r.psnr_db:.1f} dB" for r in served]
            attack = {a["attack"]: a for a in report["attacks"]}
            log.info("%s split, cut %d: %d steps, %d images; %d t <= cut, %d less noisy than the client's floor, %d raw; "
                     "gradient inversion %.1f dB (low t %.1f dB), Tweedie %.1f dB, rows linked per image %.1f dB; matched "
                     "confidently %.0f%%", client, cut, report["steps"], report["images"], report["t_at_or_below_cut"],
                     report["noise_check"]["less_noisy_than_declared"], report["raw_findings_count"],
                     attack["split_inversion"]["psnr_db"], attack["split_inversion"].get("psnr_db_low_t", math.nan),
                     attack["tweedie"]["psnr_db"], attack.get("linked_by_image", {}).get("psnr_db", math.nan),
                     100 * report["match"]["confident"])

    result = {
        "run_dir": str(run_dir), "transcript": str(transcript), "model": model_path,
        "schedule": (model_schedule or ScheduleConfig()).model_dump(), "config": config.model_dump(),
        "payloads": len(payloads), "split_steps": len(steps), "split_counts": split_counts,
        "repeated_releases": repeated,
        "unexpected_tensors": unexpected_tensors(entries), "groups": groups,
    }
    (run_dir / "audit.json").write_text(json.dumps(_strict(result), indent=2, default=str, allow_nan=False))
    _figure(run_dir / "audit.png", groups)
    if any(len(row) for row in grid_rows):
        save_grid(run_dir / "audit_grid.png", grid_rows, row_titles=grid_titles)
    else:
        log.info("no payload to show in %s", run_dir / "audit_grid.png")
    log.info("wrote %s and %s", run_dir / "audit.json", run_dir / "audit.png")
    return result


def _strict(value: Any) -> Any:
    """JSON has no infinity or NaN: write them as the strings "inf", "-inf", "nan" (epsilon of a raw release)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _log_group(report: dict[str, Any], recs: list[Reconstruction]) -> None:
    best = report["best_actual"]
    log.info(
        "%s cut %d: %d images, measured alpha_bar %.3f vs declared %.3f, %d less-noisy, %d raw; best actual attack "
        "%s %.1f dB; epsilon of one release %.3g (exact)",
        report["client_id"], report["cut"], report["images"], report["noise_check"]["measured_alpha_bar_mean"],
        report["alpha_bar"], report["noise_check"]["less_noisy_than_declared"], len(report["raw_findings"]),
        best["attack"] if best else "-", best["psnr_db"] if best else math.nan,
        report["epsilon_release"].get("epsilon_exact", math.nan),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "audit")

    def body() -> int:
        audit_run(args)
        return 0

    return run_cli(body, (AuditError, TranscriptError))


if __name__ == "__main__":
    raise SystemExit(main())
