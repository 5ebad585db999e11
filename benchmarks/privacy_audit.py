"""The privacy audit over both protocols and four cuts on digits: what the server learns vs what it can reconstruct.

Every arm is a ``collafuse-sim --audit`` run (one server and two client processes over loopback gRPC, class
groups, the server's transcript recorded and audited afterwards) with the same small budget; arms differ in
the protocol and the cut:

    ambient                     releases x_zeta once per image (docs/design.md §2)
    split                       split learning, no DP: the returned gradient gives eps exactly (docs/design.md §3);
                                the client refuses split without DP noise unless --split-max-image-exposure inf
                                (not private), which this arm passes
    split-dp0.5, split-dp2      split with per-image clipping C and Gaussian noise sigma*C on the gradient, under the
                                client's default per-image exposure cap (one ambient release at its noise floor)
    x  zeta in {0, 100, 200, 500}   (0 is the global-model baseline: x_t at t = 1 is nearly x_0)

Per arm: the best reconstruction PSNR/SSIM per attack on the recorded payloads (ambient: linear, Tweedie and
the chain with the server's final model, and the aligned mean of any copies that reached the server; split:
linear, Tweedie with the eps_hat the server sent, the gradient inversion, and every row of an image linked across
steps and combined by precision, figured per image), the payload checks (less noisy than the client's own floor,
raw x_0 / file bytes on the wire, t <= zeta), the disclosure Fréchet distance (pixel features) of server-side
images, the quality of the clients' samples (FID against 400 real digits with the real-vs-real floor of the same
sizes; conditional accuracy of a classifier trained on real digits) and epsilon as the clients' own accountants
report it: per image under replace-one with labels public (client/dp.py, client/privacy_ledger.py), the most
exposed image's over all it sent (split), and one release's (ambient).

    python benchmarks/privacy_audit.py          # ~30 min on 2 shared cores

Outputs: benchmarks/results/privacy_audit-<date>.json and ...-tradeoff.png (FID vs best PSNR, one point per
arm); prints the Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import write_result
from cut_study import QUICK, Evaluator, finished, gather
from mixed_cuts import evaluate
from tqdm import tqdm

from collafuse.common.config import Protocol
from collafuse.common.runtime import setup_logging
from collafuse.deploy.sim import SimSettings, run

log = logging.getLogger("collafuse.privacy_audit")
ROOT = Path(__file__).resolve().parents[1]
CUTS = [0, 100, 200, 500]
DP_CLIP = 0.1  # about the median norm of a gradient row 2(eps_hat - eps)/d early in training (d = 64)


@dataclass(frozen=True)
class Variant:
    name: str
    protocol: Protocol
    dp_noise_multiplier: float | None = None  # None: no DP


VARIANTS = [Variant("ambient", "ambient"), Variant("split", "split"),
            Variant("split-dp0.5", "split", 0.5), Variant("split-dp2", "split", 2.0)]


@dataclass(frozen=True)
class Budget:
    clients: int = 2
    steps: int = 60  # server steps (split: one client batch each) and each client's local steps
    batch_size: int = 32
    inference_steps: int = 20
    samples_per_class: int = 6


def arm_settings(variant: Variant, cut: int, budget: Budget, seed: int, work: Path) -> SimSettings:
    dp: dict[str, Any] = {} if variant.dp_noise_multiplier is None else {"dp_clip": DP_CLIP, "dp_noise_multiplier": variant.dp_noise_multiplier}
    if variant.protocol == "split" and variant.dp_noise_multiplier is None:
        # Without DP noise a split send reveals its image: the client sends nothing unless the cap is lifted.
        dp["split_max_image_exposure"] = math.inf
    return SimSettings(
        clients=budget.clients, partition="classes", cut=cut, protocol=variant.protocol,
        steps=budget.steps, client_steps=budget.steps, batch_size=budget.batch_size,
        inference_steps=budget.inference_steps, samples_per_class=budget.samples_per_class, seed=seed,
        out=work / variant.name / f"cut{cut}", threads=1, timeout=3600, audit=True, audit_features="pixels", **dp,
    )


def _best(groups: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The attack with the highest PSNR (``key``, else its figure over every payload: the per-image figures of linked
    rows and native reconstructions have no low-t subset) over the arm's groups, with its group's client."""
    found = [(a.get(key, a["psnr_db"]), a, g["client_id"]) for g in groups for a in g["attacks"] if not a["simulated"]]
    found = [f for f in found if f[0] is not None]
    if not found:
        return None
    value, attack, client = max(found, key=lambda f: f[0])
    low = key.endswith("low_t") and key in attack
    return {"attack": attack["attack"], "psnr_db": value, "ssim": attack.get("ssim_low_t" if low else "ssim"),
            "client_id": client}


def client_epsilon(out: Path) -> dict[str, Any]:
    """Epsilon as the clients' own accountants report it (metrics.json "privacy": client/privacy_ledger.py
    ``privacy_report``): per image, replace-one with labels public; the most exposed image over the clients."""
    split, worst, per_release, exposure = [], [], [], []
    unbounded = False
    relation, delta = None, None
    for path in sorted((out / "clients").glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        privacy = metrics.get("privacy") or {}
        relation, delta = privacy.get("relation", relation), privacy.get("delta", delta)
        summary = privacy.get("split") or {}
        if summary.get("steps"):
            unbounded = unbounded or bool(summary.get("epsilon_unbounded"))
            if summary.get("epsilon") is not None:
                split.append(float(summary["epsilon"]))
        worst_image = (privacy.get("worst_image") or {}).get("epsilon")
        if worst_image is not None:
            worst.append(float(worst_image))
        per_release += [float(a["epsilon_per_release"]) for a in privacy.get("ambient") or [] if a.get("epsilon_per_release") is not None]
        cap = (metrics.get("contribution") or {}).get("max_image_exposure")
        if cap is not None:
            exposure.append(float(cap))
    return {"relation": relation, "delta": delta, "split_worst_image": max(split) if split else None,
            "worst_image": max(worst) if worst else None, "ambient_per_release": max(per_release) if per_release else None,
            "unbounded": unbounded, "max_image_exposure_releases": max(exposure) if exposure else None}


def audit_summary(out: Path) -> dict[str, Any]:
    """Per arm from audit.json: best PSNR per attack (mean over clients), checks, disclosure, epsilon."""
    audit = json.loads((out / "audit.json").read_text())
    groups = audit["groups"]
    attacks: dict[str, dict[str, list[float]]] = {}
    for g in groups:
        for a in g["attacks"]:
            if a["simulated"]:
                continue
            entry = attacks.setdefault(a["attack"], {"psnr_db": [], "ssim": [], "psnr_db_low_t": [], "ssim_low_t": []})
            for k in entry:
                if a.get(k) is not None:
                    entry[k].append(float(a[k]))
    per_attack = {name: {k: (max(v) if v else None) for k, v in values.items()} for name, values in attacks.items()}
    protocol = groups[0].get("protocol", "ambient")
    # Split: the least noisy tenth of the server's steps is where it sees most; ambient: every release is at zeta.
    headline_key = "psnr_db_low_t" if protocol == "split" else "psnr_db"
    disclosure: dict[str, list[float]] = {}
    for g in groups:
        for name, value in ((g.get("disclosure") or {}).get("frechet") or {}).items():
            disclosure.setdefault(name, []).append(float(value))
    return {
        "protocol": protocol,
        "best": _best(groups, headline_key),
        "best_all_payloads": _best(groups, "psnr_db"),
        "attacks": per_attack,
        "checks": {
            "less_noisy_than_declared": sum(g["noise_check"]["less_noisy_than_declared"] for g in groups),
            "checked_payloads": sum(g["noise_check"]["payloads"] for g in groups),
            "group_less_noisy": any(g["noise_check"]["group_less_noisy"] for g in groups),
            "raw_findings": sum(len(g["raw_findings"]) for g in groups),
            "t_at_or_below_cut": sum(g.get("t_at_or_below_cut", 0) for g in groups),
            "above_floor": sum(g.get("above_floor", 0) for g in groups),
            "against": sorted({g["noise_check"].get("against", "") for g in groups}),
            "unexpected_tensors": len(audit["unexpected_tensors"]),
            "schedule_source": sorted({g.get("schedule_source", "") for g in groups}),
        },
        "averaging": [g["averaging"] for g in groups if "averaging" in g],
        "match_confident": [g["match"]["confident"] for g in groups if "match" in g],
        "exact_rows": [a.get("exact_rows") for g in groups for a in g["attacks"] if a["attack"] == "split_inversion"],
        "disclosure_frechet_pixels": {k: sum(v) / len(v) for k, v in disclosure.items()},
        "epsilon_spent": [g.get("epsilon_spent") for g in groups if g.get("protocol") == "split"],
        # Ambient: one Gaussian release per image at zeta, in the same unit (client/dp.py release_epsilon).
        "epsilon_per_release": [(g.get("epsilon_release") or {}).get("epsilon_exact") for g in groups
                                if g.get("protocol", "ambient") == "ambient"],
        "epsilon_unbounded": any(g.get("epsilon_unbounded") for g in groups),
        "epsilon_clients": client_epsilon(out),
        # Split: every row of an image linked across steps and combined, per image (evaluation/audit/linking.py).
        "linked_per_image": max((a["psnr_db"] for g in groups for a in g["attacks"]
                                 if a["attack"] in ("linked_by_image", "linked_by_content", "linked_by_image_unclipped")),
                                default=None),
        "payloads": audit["payloads"] + sum(g.get("images", 0) for g in groups if g.get("protocol") == "split"),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    markers = {"ambient": "o", "split": "s", "split-dp0.5": "^", "split-dp2": "v"}
    for index, variant in enumerate(VARIANTS):
        points = [r for r in rows if r["variant"] == variant.name and r["audit"]["best"]]
        xs = [r["quality"]["pooled"]["fid"] for r in points]
        ys = [min(r["audit"]["best"]["psnr_db"], 150.0) for r in points]
        ax.plot(xs, ys, marker=markers[variant.name], linestyle="-", color=f"C{index}", label=variant.name)
        for r, x, y in zip(points, xs, ys):
            ax.annotate(f"ζ={r['cut']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    floors = [r["quality"]["pooled"]["floor_fid"] for r in rows if r["quality"]["pooled"].get("floor_fid")]
    if floors:
        ax.axvline(sum(floors) / len(floors), linestyle=":", color="grey", label="real-vs-real FID floor")
    ax.set_xlabel("FID of the clients' samples (lower: the system learned more)")
    ax.set_ylabel("best reconstruction PSNR vs x0, dB (capped at 150)")
    ax.set_title("What the server learns vs what it can reconstruct (digits, one point per arm)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: Any, spec: str = "{:.1f}") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return spec.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        ("| protocol | ζ | best attack | PSNR dB | SSIM | gradient inversion (low t / all) dB | rows linked, per image dB "
         "| Tweedie dB | less noisy than floor / raw | disclosure FD (pixels) | FID (floor) | accuracy "
         "| ε per image (replace-one, δ=1e-5) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, q = r["audit"], r["quality"]["pooled"]
        best = a["best"] or {}
        inv = a["attacks"].get("split_inversion") or {}
        tw = a["attacks"].get("tweedie") or a["attacks"].get("identity") or {}
        tw_key = "psnr_db_low_t" if a["protocol"] == "split" else "psnr_db"
        disc = a["disclosure_frechet_pixels"]
        disc_text = ", ".join(f"{k} {v:.0f}" for k, v in disc.items() if k in ("release", "x_t_low_band", "server_alone"))
        clients = a.get("epsilon_clients") or {}
        eps = [e for e in a["epsilon_spent"] if e is not None]
        worst = clients.get("split_worst_image") if clients.get("split_worst_image") is not None else (max(eps) if eps else None)
        eps_text = "∞" if a["epsilon_unbounded"] or clients.get("unbounded") else _fmt(worst, "{:.3g}")
        if a["protocol"] == "ambient":
            per_release = clients.get("ambient_per_release")
            if per_release is None:
                per_release = next((e for e in a.get("epsilon_per_release", []) if e is not None), None)
            eps_text = f"{_fmt(per_release, '{:.3g}')} per release" if per_release is not None else "–"
        checks = a["checks"]
        lines.append(
            f"| {r['variant']} | {r['cut']} | {best.get('attack', '–')} | {_fmt(best.get('psnr_db'))} | "
            f"{_fmt(best.get('ssim'), '{:.2f}')} | {_fmt(inv.get('psnr_db_low_t'))} / {_fmt(inv.get('psnr_db'))} | "
            f"{_fmt(a.get('linked_per_image'))} | {_fmt(tw.get(tw_key))} | {checks['less_noisy_than_declared']} / {checks['raw_findings']} | {disc_text or '–'} | "
            f"{_fmt(q.get('fid'))} ({_fmt(q.get('floor_fid'))}) | {_fmt(q.get('accuracy'), '{:.2f}')} | {eps_text} |"
        )
    return "\n".join(lines)


def retabulate(path: Path, work: Path) -> int:
    """Re-read every arm's audit.json (e.g. after the summary changed) into an existing result file."""
    record = json.loads(path.read_text())
    for row in record["rows"]:
        row["audit"] = audit_summary(work / row["variant"] / f"cut{row['cut']}")
    record["table_markdown"] = table(record["rows"])
    path.write_text(json.dumps(record, indent=2) + "\n")
    plot(record["rows"], path.with_name(path.stem + "-tradeoff.png"))
    print(record["table_markdown"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, nargs="+", default=CUTS)
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], choices=[v.name for v in VARIANTS])
    parser.add_argument("--steps", type=int, default=Budget.steps, help="every arm's server and client steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "privacy_audit")
    parser.add_argument("--retabulate", type=Path, metavar="JSON",
                        help="train and evaluate nothing: re-read the audits of a result file's arms, rewrite it and its table")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse an arm whose folder holds a finished, audited run with the same settings")
    args = parser.parse_args(argv)
    setup_logging("INFO", "privacy-audit")
    if args.retabulate:
        return retabulate(args.retabulate, args.work)
    started = time.monotonic()
    budget = Budget(steps=args.steps)
    evaluator = Evaluator(QUICK, args.work)  # 400 real reference digits, the classifier
    rows: list[dict[str, Any]] = []
    arms = [(v, c) for v in VARIANTS if v.name in args.variants for c in args.cuts]
    for variant, cut in tqdm(arms, desc="privacy audit arms", unit="arm"):
        settings = arm_settings(variant, cut, budget, args.seed, args.work)
        arm_started = time.monotonic()
        if args.resume and finished(settings) and (settings.out / "audit.json").is_file():
            log.info("reusing the finished run in %s", settings.out)
        else:
            run(settings)
        quality = evaluate(evaluator, settings, gather(settings))
        row = {"variant": variant.name, "protocol": variant.protocol, "cut": cut,
               "dp": {"clip": DP_CLIP, "noise_multiplier": variant.dp_noise_multiplier} if variant.dp_noise_multiplier is not None else None,
               "audit": audit_summary(settings.out), "quality": quality, "arm_seconds": time.monotonic() - arm_started}
        rows.append(row)
        best = row["audit"]["best"] or {}
        log.info("%s cut %d: best %s %.1f dB; FID %.1f (floor %.1f), accuracy %.2f; epsilon %s", variant.name, cut,
                 best.get("attack"), best.get("psnr_db") or float("nan"), quality["pooled"]["fid"],
                 quality["pooled"]["floor_fid"] or float("nan"), quality["pooled"]["accuracy"], row["audit"]["epsilon_spent"])
    markdown = table(rows)
    path = write_result("privacy_audit", {
        "budget": budget.__dict__, "dp_clip": DP_CLIP, "seed": args.seed, "cuts": args.cuts,
        "reference_real_images": len(evaluator.reference), "classifier_real_heldout_accuracy": evaluator.heldout,
        "wall_seconds": time.monotonic() - started, "rows": rows, "table_markdown": markdown,
    })
    plot(rows, path.with_name(path.stem + "-tradeoff.png"))
    print(markdown)
    print(f"\nwrote {path} and {path.with_name(path.stem + '-tradeoff.png')} in {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
