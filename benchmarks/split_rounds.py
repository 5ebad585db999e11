"""Split learning in synchronous rounds against ambient and GM at equal images seen (issue 22 item 8).

Class-partitioned clients (``--partition classes``: every class lives on exactly one client) of the bundled
digits, through the real system (``collafuse-sim``: one server and K client processes over loopback gRPC),
at K = 3 and K = 8 clients. Three arms per K, every one with the same server budget:

    ambient  protocol ambient, cut 200: the server trains ``--steps`` steps of batch B on the clients' releases
    split    protocol split, cut 200: ``--steps`` rounds; each client sends B // K images a round, so one round
             (one optimizer step of the server's model) holds B images
    gm       protocol ambient, cut 0: the global-model baseline (raw images to the server; it generates alone)

B = ``--batch-size`` (48: divisible by 3 and by 8), so the server sees steps x B images in every arm. The
clients' local models train identically in every arm (``--client-steps`` steps of batch B). Per arm: FID and
KID of the pooled samples (every client generates ``--samples-per-class`` images of each class it holds, so
10 x that in all) against real digits, with the real-vs-real floor of the same sizes; conditional accuracy
(a classifier trained on the real digits), pooled and per client; and for split the clients' step counters
(steps applied, steps late, the server step their last step landed on).

Goal stated by the issue: split within 10 % of ambient's FID and within 0.03 of its accuracy.

    python benchmarks/split_rounds.py                     # K = 3 and 8, 3 arms each, seed 0, 250 steps: ~49 min
                                                          # on 2 cores shared with other jobs (29 sims + 20 eval)
    python benchmarks/split_rounds.py --clients 3 --arms split --steps 60 --client-steps 60 --tag timing

Outputs: benchmarks/results/split_rounds-<date>[-tag].json (machine, settings, every arm), ...-fid.png (FID
with its floor and accuracy per arm and K) and ...-samples.png (one row per arm and K: two samples of each
class, taken from the pooled samples). Runs are kept under runs/split_rounds/k<K>/<arm>/seed<s>/ and reused
when re-run with the same settings (``--no-resume`` redoes them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from cut_study import ArmOutputs, Evaluator, Mode, finished, gather, machine
from tqdm import tqdm

from collafuse.common.images import grid
from collafuse.common.runtime import setup_logging
from collafuse.deploy.sim import DIGITS_SIDE, SimSettings, run
from collafuse.evaluation.metrics.classifier import conditional_accuracy

log = logging.getLogger("collafuse.split_rounds")
ROOT = Path(__file__).resolve().parents[1]
Arm = Literal["ambient", "split", "gm"]
ARMS: list[Arm] = ["ambient", "split", "gm"]
CLIENT_COUNTS = [3, 8]
# The goal for split against ambient.
FID_TOLERANCE = 0.10  # relative
ACCURACY_TOLERANCE = 0.03  # absolute


def source() -> dict[str, Any]:
    """Which code the simulations ran: the collafuse package's folder, its git commit and uncommitted files."""
    from collafuse.deploy import sim

    root = Path(sim.__file__).resolve().parents[1]
    info: dict[str, Any] = {"root": str(root)}
    try:
        git = ["git", "-C", str(root)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.splitlines()
        info["uncommitted_files"] = [line[3:] for line in changed]
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def arm_settings(args: argparse.Namespace, arm: Arm, clients: int, seed: int) -> SimSettings:
    split = arm == "split"
    return SimSettings(
        clients=clients, partition="classes", protocol="split" if split else "ambient",
        cut=0 if arm == "gm" else args.cut, steps=args.steps, client_steps=args.client_steps,
        batch_size=args.batch_size, split_batch_size=args.batch_size // clients if split else None,
        # No DP in this comparison of training quality: the clients accept that split reveals their images.
        split_max_image_exposure=math.inf if split else 1.0,
        inference_steps=args.inference_steps, samples_per_class=args.samples_per_class, seed=seed,
        server_preset=args.preset, client_preset=args.preset,
        out=args.work / f"k{clients}" / arm / f"seed{seed}", threads=1, timeout=args.timeout,
        # Given, not inferred: the sim records its settings with these filled in, and --resume compares.
        image_size=DIGITS_SIDE, channels=1,
    )


def split_counters(outputs: ArmOutputs) -> dict[str, Any]:
    """What the split clients' reports say about the rounds: steps applied and late, images sent, the server
    step each client's last step landed on, and why it stopped."""
    per_client = {}
    for k, metrics in enumerate(outputs.client_metrics):
        release = metrics.get("contribution") or {}
        per_client[f"client-{k}"] = {key: release.get(key) for key in
                                     ("steps", "late", "sent", "server_step", "calls", "stopped", "seconds")}
    steps = [c["steps"] or 0 for c in per_client.values()]
    return {
        "clients": per_client,
        "images_sent": int(sum(c["sent"] or 0 for c in per_client.values())),
        "steps_min": int(min(steps)), "steps_max": int(max(steps)),
        "late": int(sum(c["late"] or 0 for c in per_client.values())),
    }


def evaluate(evaluator: Evaluator, settings: SimSettings, outputs: ArmOutputs) -> dict[str, Any]:
    """Pooled FID/KID against the real reference with its floor, accuracy pooled and per client."""
    _, pooled = evaluator.pooled(outputs)
    clients: dict[str, Any] = {}
    for k, samples in enumerate(outputs.samples):
        requested = [str(int(v)) for v in outputs.labels[k]]
        clients[f"client-{k}"] = {
            "classes": sorted({int(v) for v in outputs.labels[k]}), "n_fake": len(samples),
            "accuracy": conditional_accuracy(evaluator.classifier, samples.numpy(), requested, evaluator.heldout).accuracy,
        }
    server = outputs.server_metrics
    result: dict[str, Any] = {
        "pooled": pooled, "clients": clients,
        "server_step": server.get("step"),
        "server_final_loss": (server.get("losses") or [[None, None]])[-1][1],
        "server_wall_time_s": server.get("wall_time_s"),
        "images_seen_by_server": (server.get("step") or 0) * settings.batch_size,
        "wall_seconds": outputs.wall_seconds,
        "grids": [str(settings.out / "grids" / f"client-{k}.png") for k in range(settings.clients)],
    }
    if settings.protocol == "split":
        result["split"] = split_counters(outputs)
        result["images_seen_by_server"] = result["split"]["images_sent"]
    return result


def goal(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Split against ambient at one K: within FID_TOLERANCE of its FID and ACCURACY_TOLERANCE of its accuracy."""
    if "split" not in results or "ambient" not in results:
        return {}
    split, ambient = results["split"]["pooled"], results["ambient"]["pooled"]
    fid_ok = split["fid"] <= (1 + FID_TOLERANCE) * ambient["fid"]
    accuracy_ok = split["accuracy"] >= ambient["accuracy"] - ACCURACY_TOLERANCE
    return {"fid_ratio": split["fid"] / ambient["fid"], "fid_within_10pct": bool(fid_ok),
            "accuracy_gap": ambient["accuracy"] - split["accuracy"], "accuracy_within_0.03": bool(accuracy_ok),
            "met": bool(fid_ok and accuracy_ok)}


def plot(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    counts = list(runs)
    arms = [a for a in ARMS if any(a in runs[k] for k in counts)]
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        xs = np.arange(len(counts)) + (i - (len(arms) - 1) / 2) * width
        fid = [runs[k][arm]["pooled"]["fid"] if arm in runs[k] else np.nan for k in counts]
        accuracy = [runs[k][arm]["pooled"]["accuracy"] if arm in runs[k] else np.nan for k in counts]
        floor = [runs[k][arm]["pooled"]["floor_fid"] or np.nan if arm in runs[k] else np.nan for k in counts]
        axes[0].bar(xs, fid, width, label=arm, color=f"C{i}")
        axes[0].scatter(xs, floor, marker="_", s=300, color="black", zorder=3,
                        label="real-vs-real floor" if i == 0 else None)
        axes[1].bar(xs, accuracy, width, label=arm, color=f"C{i}")
        for x, f, a in zip(xs, fid, accuracy):
            if not np.isnan(f):
                axes[0].text(x, f, f"{f:.1f}", ha="center", va="bottom", fontsize=7)
                axes[1].text(x, a, f"{a:.2f}", ha="center", va="bottom", fontsize=7)
    for ax, label in ((axes[0], "FID (lower is better)"), (axes[1], "conditional accuracy")):
        ax.set_xticks(np.arange(len(counts)), [f"{k} clients" for k in counts])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[1].set_ylim(0, 1.05)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_row(outputs: ArmOutputs, per_class: int = 2) -> torch.Tensor:
    """The first ``per_class`` pooled samples of every class, in class order."""
    fake = torch.cat(outputs.samples)
    labels = np.concatenate(outputs.labels)
    picks = [i for c in sorted({int(v) for v in labels}) for i in np.flatnonzero(labels == c)[:per_class]]
    return fake[torch.as_tensor(picks, dtype=torch.long)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENT_COUNTS, help="client counts K")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=250, help="server steps (split: rounds) of every arm")
    parser.add_argument("--client-steps", type=int, default=None, help="local steps of each client (default: --steps)")
    parser.add_argument("--batch-size", type=int, default=48,
                        help="server batch B (split: B // K images per client per round) and the clients' local batch")
    parser.add_argument("--cut", type=int, default=200, help="cut of the ambient and split arms")
    parser.add_argument("--preset", default="tiny", help="server and client UNet preset")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--samples-per-class", type=int, default=30,
                        help="per class a client holds (classes partition: 10x this per arm in all)")
    parser.add_argument("--reference", type=int, default=600, help="real images in the FID reference set (0: all)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="most seconds one simulation may take")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "split_rounds")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse a run folder that holds a finished run with the same settings")
    args = parser.parse_args(argv)
    if args.client_steps is None:
        args.client_steps = args.steps
    for clients in args.clients:
        if args.batch_size % clients:
            parser.error(f"--batch-size {args.batch_size} is not divisible by {clients} clients: split rounds would "
                         "not hold B images")
    setup_logging("INFO", "split-rounds")
    # SIGTERM unwinds like Ctrl-C, so that a running simulation stops its processes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    mode = Mode("split_rounds", steps=args.steps, batch_size={"classes": args.batch_size},
                inference_steps=args.inference_steps, seeds=tuple(args.seeds),
                samples_per_class={"classes": args.samples_per_class}, reference=args.reference,
                handoff_disclosure=False, disclosure_images=0)
    plan = [(k, arm, s) for s in args.seeds for k in args.clients for arm in args.arms]
    # Every simulation first, then the evaluation (Inception on the CPU is slow): a run cut short keeps its
    # finished simulations, which --resume reuses.
    sim_seconds: dict[str, float] = {}
    for clients, arm, seed in tqdm(plan, desc="split-rounds simulations", unit="arm"):
        settings = arm_settings(args, arm, clients, seed)
        name = f"k{clients}/{arm}/seed{seed}"
        if args.resume and finished(settings):
            log.info("%s: reusing the finished run in %s", name, settings.out)
            continue
        log.info("%s: simulating into %s", name, settings.out)
        tic = time.monotonic()
        summary = run(settings)
        sim_seconds[name] = time.monotonic() - tic
        log.info("%s: simulated in %.0f s (server step %s)", name, sim_seconds[name],
                 (summary.get("server") or {}).get("step"))
    evaluator = Evaluator(mode, args.work)
    runs: dict[str, dict[str, Any]] = {}  # "<K>" -> arm -> result (the first seed; every seed in "by_seed")
    by_seed: list[dict[str, Any]] = []
    rows: list[tuple[str, torch.Tensor]] = []
    for clients, arm, seed in tqdm(plan, desc="split-rounds evaluation", unit="arm"):
        settings = arm_settings(args, arm, clients, seed)
        outputs = gather(settings)
        tic = time.monotonic()
        result = evaluate(evaluator, settings, outputs)
        result.update(clients_k=clients, arm=arm, seed=seed, eval_seconds=time.monotonic() - tic)
        by_seed.append(result)
        if seed == args.seeds[0]:
            runs.setdefault(str(clients), {})[arm] = result
            rows.append((f"K={clients} {arm}", sample_row(outputs)))
        pooled = result["pooled"]
        log.info("K=%d %s seed %d: FID %.1f (floor %.1f), KID %.4f, accuracy %.3f, per client %s; server step %s, "
                 "images seen %s%s", clients, arm, seed, pooled["fid"], pooled["floor_fid"] or float("nan"),
                 pooled["kid"], pooled["accuracy"], [round(c["accuracy"], 2) for c in result["clients"].values()],
                 result["server_step"], result["images_seen_by_server"],
                 f", split {result['split']}" if "split" in result else "")
    goals = {k: goal(arms) for k, arms in runs.items()}
    stamp = dt.date.today().isoformat() + (f"-{args.tag}" if args.tag else "")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"split_rounds-{stamp}.json"
    wall_seconds = time.monotonic() - started
    payload = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sim_settings": {f"k{k}/{a}": json.loads(arm_settings(args, a, k, args.seeds[0]).model_dump_json())
                         for k in args.clients for a in args.arms},
        "reference_real_images": len(evaluator.reference),
        "classifier_real_heldout_accuracy": evaluator.heldout,
        "goal": {"statement": f"split FID <= (1 + {FID_TOLERANCE}) x ambient FID and split accuracy >= ambient "
                              f"accuracy - {ACCURACY_TOLERANCE}", "by_clients": goals},
        "wall_seconds": wall_seconds,
        "simulation_seconds_this_invocation": sim_seconds,
        "runs": runs,
        "by_seed": by_seed,
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    title = (f"class-partitioned digits, {args.steps} server steps x batch {args.batch_size} in every arm, "
             f"cut {args.cut} (gm: 0), seed {args.seeds[0]}")
    plot(runs, args.results / f"split_rounds-{stamp}-fid.png", title)
    grid([r for _, r in rows], row_titles=[t for t, _ in rows], max_columns=None).save(
        args.results / f"split_rounds-{stamp}-samples.png")
    print("\nK  arm      FID (floor)    KID      accuracy  server steps  images seen")
    for k, arms in runs.items():
        for arm, result in arms.items():
            p = result["pooled"]
            print(f"{k:<2} {arm:<8} {p['fid']:6.1f} ({p['floor_fid'] or float('nan'):5.1f})  {p['kid']:.4f}  "
                  f"{p['accuracy']:.3f}     {result['server_step']!s:<13} {result['images_seen_by_server']}")
        print(f"   goal: {goals[k]}")
    print(f"\nwrote {out} in {wall_seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
