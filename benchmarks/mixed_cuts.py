"""The ambient loss with clients at different cuts: unweighted ("standard") against the pooled weighting.

Three clients on IID shards of the bundled digits (every client holds every class), or with
``--partition classes`` non-IID (client k holds its own class group: the case the pooled weighting was built for,
where each cut's posterior is a different client's classes), at cuts {100, 200, 500}, through the real system (``collafuse-sim --cuts 100 200 500``), once with the
server's ``--ambient-weighting standard`` and once with ``pooled`` (common/diffusion.py::
ambient_pooled_weights), with the same budgets and seeds. Each client finishes its own samples from
the server's hand-off at its own cut; per client the script reports FID against the real digits
(the shards are IID; with the real-vs-real floor of the same sizes) and conditional accuracy (a classifier trained
on the real digits), and the same pooled over the clients.

    python benchmarks/mixed_cuts.py             # 2 seeds, 300 server steps: ~10 min on 2 quiet cores
    python benchmarks/mixed_cuts.py --seeds 0 --steps 120
    python benchmarks/mixed_cuts.py --partition classes  # non-IID: per-client FID against the client's own classes

Outputs: benchmarks/results/mixed_cuts-<date>[-tag].json (machine, settings, every run, mean and
spread over seeds) and ...-fid.png (per-client FID and accuracy, standard vs pooled).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import save_figure
from cut_study import ArmOutputs, Evaluator, Mode, finished, gather, machine
from tqdm import tqdm

from collafuse.common.config import AmbientWeighting
from collafuse.common.runtime import setup_logging
from collafuse.deploy.sim import DIGITS_SIDE, SimSettings, run
from collafuse.evaluation.metrics.classifier import conditional_accuracy

log = logging.getLogger("collafuse.mixed_cuts")
ROOT = Path(__file__).resolve().parents[1]
CUTS = [100, 200, 500]
WEIGHTINGS: list[AmbientWeighting] = ["standard", "pooled"]


def arm_settings(args: argparse.Namespace, weighting: AmbientWeighting, seed: int) -> SimSettings:
    return SimSettings(
        clients=len(args.cuts), cuts=args.cuts, partition=args.partition, steps=args.steps, client_steps=args.client_steps,
        batch_size=args.batch_size, inference_steps=args.inference_steps, samples_per_class=args.samples_per_class,
        seed=seed, ambient_weighting=weighting, ambient_max_weight=args.max_weight,
        out=args.work / args.partition / weighting / f"seed{seed}", threads=1, timeout=3600,
        # Given, not inferred: the sim records its settings with these filled in, and --resume compares.
        image_size=DIGITS_SIDE, channels=1,
    )


def evaluate(evaluator: Evaluator, settings: SimSettings, outputs: ArmOutputs) -> dict[str, Any]:
    """Per client (its own samples) and pooled: FID against the real reference (IID) or the client's own real
    images (non-IID), its floor, accuracy."""
    features, pooled = evaluator.pooled(outputs)
    clients: dict[str, Any] = {}
    offset = 0
    for k, samples in enumerate(outputs.samples):
        part = features[offset: offset + len(samples)]
        offset += len(samples)
        requested = [str(int(v)) for v in outputs.labels[k]]
        # IID shards: every client's data has the whole set's distribution, so the whole reference set is
        # its real set (three times the images of its own share: a steadier FID). Non-IID: its own classes.
        mask = None
        if settings.partition != "iid":
            mask = evaluator.client_mask(settings.out / "data" / "shards" / f"client-{k}")
        real = evaluator.real_features if mask is None else evaluator.real_features[mask]
        entry: dict[str, Any] = {"cut": settings.cut_of(k), **evaluator.fid(part, real)}
        entry["floor_fid"] = evaluator.floor(len(samples), mask)
        entry["accuracy"] = conditional_accuracy(evaluator.classifier, samples.numpy(), requested,
                                                 evaluator.heldout).accuracy
        clients[f"client-{k}"] = entry
    server = outputs.server_metrics
    return {"pooled": pooled, "clients": clients, "server_final_loss": (server.get("losses") or [[None, None]])[-1][1],
            "wall_seconds": outputs.wall_seconds}


def stat(values: list[float]) -> dict[str, float | int]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for weighting, results in runs.items():
        row: dict[str, Any] = {"pooled": {k: stat([r["pooled"][k] for r in results]) for k in ("fid", "floor_fid", "accuracy")}}
        for name in results[0]["clients"]:
            row[name] = {"cut": results[0]["clients"][name]["cut"],
                         **{k: stat([r["clients"][name][k] for r in results]) for k in ("fid", "floor_fid", "accuracy")}}
        summary[weighting] = row
    return summary


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    names = [n for n in next(iter(summary.values())) if n != "pooled"] + ["pooled"]
    width = 0.8 / len(summary)
    for i, (weighting, row) in enumerate(summary.items()):
        xs = np.arange(len(names)) + (i - (len(summary) - 1) / 2) * width
        for ax, key in ((axes[0], "fid"), (axes[1], "accuracy")):
            ax.bar(xs, [row[n][key]["mean"] for n in names], width, yerr=[row[n][key]["std"] for n in names],
                   capsize=3, label=weighting, color=f"C{i}")
    floors = [next(iter(summary.values()))[n]["floor_fid"]["mean"] for n in names]
    axes[0].scatter(np.arange(len(names)), floors, marker="_", s=400, color="grey", label="real-vs-real floor", zorder=3)
    ticks = [f"{n}\ncut {next(iter(summary.values()))[n]['cut']}" if n != "pooled" else "pooled" for n in names]
    for ax, label in ((axes[0], "FID (lower is better)"), (axes[1], "conditional accuracy")):
        ax.set_xticks(np.arange(len(names)), ticks, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, nargs="+", default=CUTS, help="one cut per client")
    parser.add_argument("--partition", choices=["iid", "classes"], default="iid",
                        help="iid (every client every class) or classes (non-IID: a class group per client)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300, help="server training steps")
    parser.add_argument("--client-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--samples-per-class", type=int, default=10, help="per client (IID: every client has 10 classes)")
    parser.add_argument("--max-weight", type=float, default=10.0, help="the server's --ambient-max-weight for pooled")
    parser.add_argument("--reference", type=int, default=400, help="real images in the FID reference set (0: all)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mixed_cuts")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse a run folder that holds a finished run with the same settings")
    args = parser.parse_args(argv)
    setup_logging("INFO", "mixed-cuts")
    # SIGTERM unwinds like Ctrl-C, so that a running simulation stops its processes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    mode = Mode("mixed_cuts", steps=args.steps, batch_size={"iid": args.batch_size}, inference_steps=args.inference_steps,
                seeds=tuple(args.seeds), samples_per_class={"iid": args.samples_per_class}, reference=args.reference,
                handoff_disclosure=False, disclosure_images=0)
    arms = [(w, s) for s in args.seeds for w in WEIGHTINGS]  # seed-major: a cut-short run still pairs the arms
    # Every simulation first, then the evaluation (Inception on the CPU is slow): a run cut short keeps its
    # finished simulations, which --resume reuses.
    for weighting, seed in tqdm(arms, desc="mixed-cuts simulations", unit="arm"):
        settings = arm_settings(args, weighting, seed)
        if not (args.resume and finished(settings)):
            run(settings)
    evaluator = Evaluator(mode, args.work)
    runs: dict[str, list[dict[str, Any]]] = {}
    for weighting, seed in arms:
        settings = arm_settings(args, weighting, seed)
        result = evaluate(evaluator, settings, gather(settings))
        result["seed"] = seed
        runs.setdefault(weighting, []).append(result)
        log.info("%s seed %d: pooled FID %.1f (floor %.1f), accuracy %.2f; per client %s", weighting, seed,
                 result["pooled"]["fid"], result["pooled"]["floor_fid"] or float("nan"), result["pooled"]["accuracy"],
                 {n: (c["cut"], round(c["fid"], 1), round(c["accuracy"], 2)) for n, c in result["clients"].items()})
    summary = summarise(runs)
    stamp = dt.date.today().isoformat() + ("-noniid" if args.partition == "classes" else "") + (
        f"-{args.tag}" if args.tag else "")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"mixed_cuts-{stamp}.json"
    wall_seconds = time.monotonic() - started
    payload = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "reference_real_images": len(evaluator.reference),
        "classifier_real_heldout_accuracy": evaluator.heldout,
        "wall_seconds": wall_seconds,
        "summary": summary,
        "runs": runs,
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    title = (f"cuts {args.cuts}, {'IID' if args.partition == 'iid' else 'class-partitioned'} digits, {args.steps} server steps, seeds {args.seeds}: "
             "ambient standard vs pooled weighting")
    plot(summary, args.results / f"mixed_cuts-{stamp}-fid.png", title)
    print("\nweighting  client (cut)  FID (floor)  accuracy")
    for weighting, row in summary.items():
        for name, entry in row.items():
            label = f"{name} ({entry['cut']})" if "cut" in entry else name
            print(f"  {weighting:<9} {label:<16} {entry['fid']['mean']:.1f}±{entry['fid']['std']:.1f} "
                  f"({entry['floor_fid']['mean']:.1f})  {entry['accuracy']['mean']:.2f}±{entry['accuracy']['std']:.2f}")
    print(f"\nwrote {out} in {wall_seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
