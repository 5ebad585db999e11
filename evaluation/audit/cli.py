"""``collafuse-audit RUN_DIR``: audit a recorded run (the server's transcript plus the clients' data).

Reads, relative to RUN_DIR (the layout of ``collafuse-sim --transcript``; each path can be overridden):

    server/transcript.jsonl          every request the server read (server --transcript)
    server/checkpoints/latest/ema    the server's model (attacks with a model are skipped without it)
    data/shards/<client-id>/         each client's images (the truth the attacks are scored against)
    clients/<client-id>/             each client's ledger (image keys, the pinned schedule and noise floor)
                                     and metrics.json (its release report: refused copies, DP settings)

Both protocols: ambient releases are audited per (client, cut) (``core.audit_group``), split steps per
client (``split.audit_split``: the real gradient inversion on the recorded x_t, eps_hat and gradients).
The noise check uses the schedule the client pinned in its ledger (what it actually used), not the
server's.

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

from collafuse.common.data import DataError, load_image_folder
from collafuse.common.diffusion import Denoiser
from collafuse.common.images import save_grid
from collafuse.common.models import as_denoiser, load_model
from collafuse.common.runtime import run_cli, setup_logging
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.audit.attacks import Reconstruction
from collafuse.evaluation.audit.core import AuditConfig, audit_group
from collafuse.evaluation.audit.disclosure import (
    PixelFeatures,
    disclosure,
    inception_features,
    server_side_images,
)
from collafuse.evaluation.audit.payloads import match_to_originals
from collafuse.evaluation.audit.split import DpParams, audit_split
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
    p.add_argument("--chain-steps", type=int, default=0, help="steps of the chain attacks (0: every step from the cut)")
    p.add_argument("--chains", nargs="*", default=["ddim", "ddpm"], choices=["ddim", "ddpm"])
    p.add_argument("--dp-noise", type=float, nargs="*", default=[0.5, 2.0], help="sigma of the simulated DP split step")
    p.add_argument("--dp-clip", type=float, default=None, help="C of the simulated DP split step (default: median norm)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--features", choices=["inception", "pixels", "none"], default="inception",
                   help="features of the disclosure Fréchet distance (none: skip it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    return p


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


def _match(payloads: list[ReleasePayload], client_dir: Path, shard: Path, paths: list[str], x0: torch.Tensor) -> list[int]:
    """Index into the client's images of each payload: through its ledger's keys, else by correlation."""
    from collafuse.client.ledger import LEDGER_FILE, Ledger

    if (client_dir / LEDGER_FILE).is_file():
        with Ledger(client_dir) as ledger:
            index = {key: i for i, key in enumerate(ledger.image_keys(x0))}
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
    denoiser, schedule, model_path = _load_server(args.model or run_dir / "server" / "checkpoints" / "latest" / "ema")
    if schedule is None:
        schedule = ScheduleConfig()
        log.warning("no schedule recorded with the model: assuming the default %s", schedule.model_dump())
    config = AuditConfig(chains=args.chains, chain_steps=args.chain_steps, dp_noise=args.dp_noise,
                         dp_clip=args.dp_clip, delta=args.delta, seed=args.seed)
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
    extractor: FeatureExtractor | None = None
    if args.features == "pixels":
        extractor = PixelFeatures(image_shape)
    elif args.features == "inception":
        extractor = inception_features()

    def load(client: str) -> tuple[Path, Any]:
        shard = shards[client]
        if not shard.is_dir():
            raise AuditError(f"no images for {client} at {shard}: pass --data {client}=PATH")
        try:
            return shard, load_image_folder(shard, image_shape[0], image_shape[1])
        except DataError as exc:
            raise AuditError(f"cannot load {client}'s images from {shard}: {exc}") from exc

    groups: list[dict[str, Any]] = []
    grid_rows: list[torch.Tensor] = []
    grid_titles: list[str] = []
    for (client, cut), group in tqdm(sorted(by_group.items()), desc="audit releases", unit="group"):
        shard, data = load(client)
        mine = records[client]
        group = group[: args.max_images]
        index = _match(group, run_dir / "clients" / client, shard, data.paths, data.images)
        x0 = data.images[index].float()
        x_cut = torch.stack([p.x_cut for p in group]).float()
        labels = torch.tensor([p.label for p in group], dtype=torch.long)
        files = {data.paths[i]: (shard / data.paths[i]).read_bytes() for i in sorted(set(index))}
        wire = b"".join({p.seq: p.wire_bytes for p in group}.values())
        # The level the client declared: alpha_bar at its cut under the schedule it pinned (what it used).
        declared = float(mine.schedule.alphas_cumprod()[cut]) if mine.schedule is not None else None
        report, recs = audit_group(x0, x_cut, labels, cut, schedule, denoiser, config, wire, files, declared)
        report.update(protocol="ambient", client_id=client, floor_alpha_bar=mine.floor_alpha_bar,
                      schedule_source="client ledger (pinned)" if declared is not None else "server model")
        report["averaging"] = {
            "releases_of_one_image_seen_by_server": max(
                (len(ps) for (c, _), ps in by_key.items() if c == client), default=0),
            "client_guard": mine.refusals(),
            "note": "the average_k* attacks are simulated: they need several noisy copies of one image, which the "
                    "client's guard refuses to send (copies skipped, re-release needs --re-release-confirm)",
        }
        if extractor is not None:
            sets = {"release": x_cut}
            if denoiser is not None:
                sets.update(server_side_images(denoiser, schedule, labels, cut, image_shape, seed=args.seed,
                                                 num_inference_steps=args.chain_steps or 100))
            report["disclosure"] = {"features": extractor.name, "frechet": disclosure(extractor, x0, sets)}
        groups.append(report)
        best = sorted(recs, key=lambda r: -r.psnr_db)
        shown = [r for r in best if r.attack in {"tweedie", "chain_ddim", "linear"}][:2] + [
            r for r in best if r.attack.startswith("split_inversion")][:2]
        grid_rows += [x0[:8], x_cut[:8]] + [r.x0_hat[:8] for r in shown]
        grid_titles += [f"{client} x0", f"x_cut (ζ={cut})"] + [f"{r.attack} {r.psnr_db:.1f} dB" for r in shown]
        _log_group(report, recs)

    for client, mine_steps in tqdm(sorted(split_by_client.items()), desc="audit split steps", unit="client"):
        shard, data = load(client)
        mine = records[client]
        cuts = {int(s.t.min()) for s in mine_steps}
        cut = int(mine.metrics.get("cut", min(cuts) - 1))
        ab = (mine.schedule or schedule).alphas_cumprod()
        files = {path: (shard / path).read_bytes() for path in data.paths}
        report, recs, x0 = audit_split(mine_steps, data.images.float(), cut, ab, mine.dp(), mine.floor_alpha_bar, files)
        report.update(client_id=client, schedule_source="client ledger (pinned)" if mine.schedule else "server model",
                      epsilon_spent=(mine.metrics.get("contribution") or {}).get("epsilon"),
                      epsilon_unbounded=(mine.metrics.get("contribution") or {}).get("epsilon_unbounded"))
        low = torch.cat([s.t for s in mine_steps]) <= report["t"]["low_band_max"]
        order = torch.nonzero(low).flatten()[: args.max_images]
        if extractor is not None and len(order) >= 2:
            x_t = torch.cat([s.x_t for s in mine_steps])[order].float()
            labels = torch.cat([s.labels for s in mine_steps])[order]
            sets = {"x_t_low_band": x_t, "split_inversion": recs[-1].x0_hat[order]}
            if denoiser is not None:
                sets.update(server_side_images(denoiser, schedule, labels, cut, image_shape, seed=args.seed,
                                                 num_inference_steps=args.chain_steps or 100))
            report["disclosure"] = {"features": extractor.name, "frechet": disclosure(extractor, x0[order], sets)}
        groups.append(report)
        show = order[:8]
        grid_rows += [x0[show], torch.cat([s.x_t for s in mine_steps])[show].float()] + [r.x0_hat[show] for r in recs[1:]]
        grid_titles += [f"{client} x0 (split)", f"x_t (t <= {report['t']['low_band_max']})"] + [
            f"{r.attack} {r.psnr_db:.1f} dB" for r in recs[1:]]
        log.info("%s split, cut %d: %d steps, %d images; %d t <= cut, %d less noisy than declared, %d raw; gradient "
                 "inversion %.1f dB (low t %.1f dB), Tweedie %.1f dB; matched confidently %.0f%%", client, cut,
                 report["steps"], report["images"], report["t_at_or_below_cut"],
                 report["noise_check"]["less_noisy_than_declared"], report["raw_findings_count"],
                 report["attacks"][2]["psnr_db"], report["attacks"][2].get("psnr_db_low_t", math.nan),
                 report["attacks"][1]["psnr_db"], 100 * report["match"]["confident"])

    result = {
        "run_dir": str(run_dir), "transcript": str(transcript), "model": model_path,
        "schedule": schedule.model_dump(), "config": config.model_dump(),
        "payloads": len(payloads), "split_steps": len(steps), "split_counts": split_counts,
        "repeated_releases": repeated,
        "unexpected_tensors": unexpected_tensors(entries), "groups": groups,
    }
    (run_dir / "audit.json").write_text(json.dumps(_strict(result), indent=2, default=str, allow_nan=False))
    _figure(run_dir / "audit.png", groups)
    save_grid(run_dir / "audit_grid.png", grid_rows, row_titles=grid_titles)
    log.info("wrote %s, %s and %s", run_dir / "audit.json", run_dir / "audit.png", run_dir / "audit_grid.png")
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
