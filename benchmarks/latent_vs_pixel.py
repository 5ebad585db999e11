"""Pixel vs latent on the same data (issue 18): the digits at 32x32, three class-partitioned clients, the same step
budget for every model, cut zeta in {0, 200, 1000}; once in pixel space (1x32x32) and once through a small
``AutoencoderKL`` (latents 4x8x8) trained on digits no client holds (the operator's public share).

Per arm: FID of the decoded samples against real digits (with the real-vs-real floor of the same sizes), conditional
accuracy (a classifier trained on real digits), client compute per generated image (sampling seconds, decoding
included), local training seconds, the server's training step time, and bytes on the wire per image (sent per
training image, received per generated image). The ratios latent/pixel are taken side by side in this one run.

    .venv/bin/python benchmarks/latent_vs_pixel.py              # ~40 minutes on 2 CPU cores
    .venv/bin/python benchmarks/latent_vs_pixel.py --steps 40 --ae-steps 40 --samples-per-class 4   # a smoke run

Writes benchmarks/results/latent_vs_pixel-<date>.json, ...-fid.png (FID and accuracy per cut, both spaces) and
...-samples.png (decoded samples per arm).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import write_result
from cut_study import Evaluator, Mode, gather
from tqdm import tqdm

from collafuse.common.autoencoder import load_autoencoder
from collafuse.common.autoencoder_train import AutoencoderTrainOptions, train_autoencoder
from collafuse.common.images import grid
from collafuse.common.runtime import setup_logging
from collafuse.deploy.sim import SimSettings, run
from collafuse.evaluation.data.digits import export_digits

log = logging.getLogger("collafuse.benchmarks.latent_vs_pixel")
ROOT = Path(__file__).resolve().parents[1]
SIDE = 32
CUTS = (0, 200, 1000)
SPACES = ("pixel", "latent")


def split_public(all_digits: Path, out: Path, public: int, seed: int) -> tuple[Path, Path]:
    """``public`` random digits (the operator's share, to train the autoencoder) and the rest (the clients')."""
    files = sorted(all_digits.rglob("*.png"))
    order = np.random.default_rng(seed).permutation(len(files))
    chosen = set(order[:public].tolist())
    for name in ("public", "clients"):
        shutil.rmtree(out / name, ignore_errors=True)
    for i, path in enumerate(files):
        target = out / ("public" if i in chosen else "clients") / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return out / "public", out / "clients"


def arm_settings(args: argparse.Namespace, space: str, cut: int, data: Path, ae: Path, work: Path) -> SimSettings:
    return SimSettings(
        dataset=str(data), clients=3, partition="classes", cut=cut, steps=args.steps, client_steps=args.steps,
        batch_size=args.batch_size, inference_steps=args.inference_steps, samples_per_class=args.samples_per_class,
        seed=args.seed, autoencoder=ae if space == "latent" else None, out=work / space / f"cut{cut}", threads=1,
        timeout=4 * 3600,
    )


def compute(settings: SimSettings) -> dict[str, Any]:
    """Client compute per generated image, the server's step time and bytes on the wire per image, from the run."""
    summary = json.loads((settings.out / "metrics.json").read_text())
    clients = list(summary["clients"].values())
    generated = sum((c.get("generate") or {}).get("images") or 0 for c in clients)
    sample_seconds = sum((c.get("generate") or {}).get("client_seconds") or 0.0 for c in clients)
    server = summary.get("server") or {}
    pooled = summary["pooled"]
    steps = server.get("step") or 0
    return {
        "client_sampling_seconds_per_image": sample_seconds / max(generated, 1),
        "client_train_seconds": sum(c.get("local_train_seconds") or 0.0 for c in clients),
        "server_step_seconds": (server.get("wall_time_s") or 0.0) / steps if steps else None,
        "server_steps": steps,
        "bytes_sent_per_training_image": pooled["bytes_sent"] / max(pooled["images"], 1),
        "bytes_received_per_generated_image": pooled["bytes_received"] / max(generated, 1),
        "generated_images": generated,
        "wall_seconds": pooled["wall_seconds"],
    }


def plot(rows: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for space, by_cut in rows.items():
        cuts = sorted(by_cut)
        axes[0].plot(cuts, [by_cut[c]["pooled"]["fid"] for c in cuts], marker="o", label=space)
        axes[1].plot(cuts, [by_cut[c]["pooled"]["accuracy"] for c in cuts], marker="o", label=space)
    floors = [r["pooled"]["floor_fid"] for by_cut in rows.values() for r in by_cut.values() if r["pooled"]["floor_fid"]]
    if floors:
        axes[0].axhline(float(np.mean(floors)), linestyle=":", color="grey", label="real-vs-real floor")
    axes[0].set_ylabel("FID (lower is better)")
    axes[1].set_ylabel("conditional accuracy")
    for ax in axes:
        ax.set_xlabel("cut point zeta (0 = GM, 1000 = ICM)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"pixel (1x{SIDE}x{SIDE}) vs latent (4x8x8) digits, same step budget")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of every model (server and clients)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ae-steps", type=int, default=400, help="autoencoder training steps")
    parser.add_argument("--public", type=int, default=400, help="digits held out for the autoencoder (no client's)")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--reference", type=int, default=400, help="real digits in the FID reference set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "latent_vs_pixel")
    args = parser.parse_args()
    setup_logging("INFO", "latent-vs-pixel")
    started = time.monotonic()
    all_digits = export_digits(args.work / f"all{SIDE}", SIDE)
    public, clients_data = split_public(all_digits, args.work, args.public, seed=1234)
    ae_dir = args.work / "autoencoder"
    ae_started = time.monotonic()
    train_autoencoder(public, ae_dir, AutoencoderTrainOptions(steps=args.ae_steps, batch_size=args.batch_size,
                                                              block_out_channels=(32, 64, 64), seed=args.seed))
    ae_report = json.loads((ae_dir / "autoencoder_training.json").read_text())
    ae_report["seconds"] = time.monotonic() - ae_started
    ae = load_autoencoder(ae_dir)
    ae_report["latent_shape"] = list(ae.latent_shape((1, SIDE, SIDE)))
    mode = Mode("latent_vs_pixel", steps=args.steps, batch_size={"noniid": args.batch_size},
                inference_steps=args.inference_steps, seeds=(args.seed,),
                samples_per_class={"noniid": args.samples_per_class}, reference=args.reference,
                handoff_disclosure=False, disclosure_images=0, side=SIDE)
    evaluator = Evaluator(mode, args.work)
    rows: dict[str, dict[int, dict[str, Any]]] = {space: {} for space in SPACES}
    figure: list[tuple[str, torch.Tensor]] = []
    arms = [(space, cut) for cut in CUTS for space in SPACES]
    for space, cut in tqdm(arms, desc="pixel vs latent arms", unit="arm"):
        settings = arm_settings(args, space, cut, clients_data, ae_dir, args.work)
        run(settings)
        outputs = gather(settings)
        _, pooled = evaluator.pooled(outputs)
        rows[space][cut] = {"pooled": pooled, "compute": compute(settings)}
        log.info("%s cut %d: FID %.1f (floor %s), accuracy %.2f", space, cut, pooled["fid"], pooled["floor_fid"],
                 pooled["accuracy"])
        pick = torch.linspace(0, len(outputs.samples[0]) - 1, 10).round().long().unique()
        figure.append((f"{space} z={cut}", outputs.samples[0][pick]))
    ratios = {}
    for cut in CUTS:
        pix, lat = rows["pixel"][cut]["compute"], rows["latent"][cut]["compute"]

        def ratio(key: str, lat: dict[str, Any] = lat, pix: dict[str, Any] = pix) -> float | None:
            return lat[key] / pix[key] if lat.get(key) and pix.get(key) else None

        ratios[str(cut)] = {key: ratio(key) for key in ("client_sampling_seconds_per_image", "client_train_seconds",
                                                       "server_step_seconds", "bytes_sent_per_training_image",
                                                       "bytes_received_per_generated_image", "wall_seconds")}
    path = write_result("latent_vs_pixel", {
        "data": f"the bundled digits at {SIDE}x{SIDE}; {args.public} held out for the autoencoder, the rest split by "
                "class over 3 clients",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "autoencoder": ae_report,
        "reference_real_images": len(evaluator.reference),
        "classifier_real_heldout_accuracy": evaluator.heldout,
        "arms": {space: {str(c): r for c, r in by_cut.items()} for space, by_cut in rows.items()},
        "latent_over_pixel": ratios,
        "wall_seconds": time.monotonic() - started,
    })
    stem = path.with_suffix("")
    plot(rows, Path(f"{stem}-fid.png"))
    grid([r for _, r in figure], row_titles=[t for t, _ in figure]).save(f"{stem}-samples.png")
    log.info("wrote %s", path)
    print(f"\n{'space':7} {'cut':>5} {'FID':>7} {'floor':>6} {'acc':>5} {'client s/img':>12} {'server s/step':>13} "
          f"{'B sent/img':>10}")
    for space, by_cut in rows.items():
        for cut, r in sorted(by_cut.items()):
            p, c = r["pooled"], r["compute"]
            print(f"{space:7} {cut:>5} {p['fid']:7.1f} {p['floor_fid'] or float('nan'):6.1f} {p['accuracy']:5.2f} "
                  f"{c['client_sampling_seconds_per_image']:12.4f} {c['server_step_seconds'] or float('nan'):13.3f} "
                  f"{c['bytes_sent_per_training_image']:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
