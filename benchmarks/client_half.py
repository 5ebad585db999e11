"""What limits the clients' half of the chain in the scarce regime (issue 19), one client at a time.

``cut_study.py --swap-halves`` found that in the scarce regime (10 IID clients of about 180 digits each) the
clients' low-noise models hold quality back: with GM's model below the cut the same server reaches GM's FID and
accuracy. This asks which client-side knob would fix that. One client's shard (180 IID digits at 16x16, the study's
size) trains its local model on t in [1, 200] with the client's own trainer (client/trainer.py::train_local) under
each setting; the model then finishes x_200 of 300 held-out real digits (30 per class, ``q_sample`` at the cut: the
hand-off of a perfect server) through the client's half of the chain (common/sampling.py::client_half). Reported per
setting and seed: FID against the study's real reference, conditional accuracy (the study's classifier), training
seconds and the final loss. The "real" row scores the 300 held-out digits themselves: what a perfect client gets.

Every setting changes one thing against ``base`` (batch 16, 600 steps: the study's clients at 600 steps per model):

    batch4      batch 4 for 2,400 steps (the same image-steps, four times the updates)
    lr1e-3      learning rate 1e-3 (base: 2e-3)
    lr4e-3      learning rate 4e-3
    small       the server's UNet preset (attention at the lowest resolution)
    nodropout   no classifier-free label drop-out (the client's half at guidance 1 never uses the null label)
    alldata     1,497 images instead of 180 (the other clients' data too, none of the held-out): data, same steps
    steps2x     1,200 steps (twice the compute)
    steps4x     2,400 steps
    linear      t drawn in proportion to t (--local-timesteps linear): more of the noisier steps, same steps
    ema0.98     EMA decay 0.98 for the sampled weights (base: 0.995, which the warm-up (1 + n)/(10 + n) caps at
                0.985 by step 600, as it does 0.99: the same model; 0.98 binds from step 440)
    ema0        no EMA: the last weights
    base+g2     base's model sampled with guidance 2 in the client's half
    base+250    base's model with 250 inference steps (the client's half takes 50 steps instead of 10)
    base+ddim   base's model with DDIM (eta 0) in the client's half

Screen-only settings: changes the library does not offer (none won), applied by patching the trainer's optimizer or
the client loss's t-draw for that one training (``screen_patches``):

    beta2       AdamW beta2 0.99 instead of 0.999 (the second moment adapts faster in a short training)
    emb10       the class embedding learns at 10x the learning rate (the label's path into the model)
    tcurve      linear t-draws for the first half of the steps, uniform for the rest (a curriculum)
    tmix        half of each batch drawn linearly, half uniformly

    python benchmarks/client_half.py                       # every setting, seeds 0 and 1: ~45 min on 2 cores
    python benchmarks/client_half.py --settings base batch4 steps4x --seeds 0 1 2
    python benchmarks/client_half.py --settings base beta2 emb10 tcurve tmix --seeds 0 1 2 --tag screen   # 7.8 min

Outputs: benchmarks/results/client_half[-tag]-<date>.json and the same name .png (FID and accuracy per setting).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from bench_common import RESULTS, save_figure, write_result
from cut_study import STUDY, Evaluator
from tqdm import tqdm

from collafuse.client.trainer import train_local
from collafuse.common import diffusion, train_loop
from collafuse.common.config import ClientSettings, LocalTimesteps
from collafuse.common.diffusion import q_sample
from collafuse.common.models import as_denoiser, load_model
from collafuse.common.runtime import setup_logging
from collafuse.common.sampling import SchedulerKind, client_half, make_chain
from collafuse.common.schedule import ScheduleConfig
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.classifier import conditional_accuracy

log = logging.getLogger("collafuse.client_half")
ROOT = Path(__file__).resolve().parents[1]
CUT = 200
SHARD = 180  # a scarce client's images (1,797 digits over 10 IID clients)
HELD_OUT_PER_CLASS = 30
MODE = replace(STUDY, name="study-steps600")  # the study's 16x16 digits, reference set and classifier


@dataclass(frozen=True)
class Setting:
    """How one client model is trained and how it finishes the chain."""

    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    preset: str = "tiny"
    label_dropout: float = 0.1
    local_timesteps: LocalTimesteps = "uniform"
    images: int = SHARD
    scheduler: SchedulerKind = "ddpm"
    guidance_scale: float = 1.0
    inference_steps: int = 50
    ema_decay: float = 0.995
    # Screen-only (screen_patches): AdamW's beta2, the class embedding's learning-rate factor, and how the t-draws
    # change over training or within a batch ("fixed": local_timesteps throughout).
    adam_beta2: float = 0.999
    embedding_lr_scale: float = 1.0
    draws: Literal["fixed", "curriculum", "mix"] = "fixed"

    def training(self) -> tuple[Any, ...]:
        """What the trained model depends on (sampling variants reuse one model)."""
        return (self.batch_size, self.steps, self.lr, self.preset, self.label_dropout, self.local_timesteps, self.images,
                self.ema_decay, self.adam_beta2, self.embedding_lr_scale, self.draws)


BASE = Setting()
SETTINGS: dict[str, Setting] = {
    "base": BASE,
    "batch4": replace(BASE, batch_size=4, steps=2400),
    "lr1e-3": replace(BASE, lr=1e-3),
    "lr4e-3": replace(BASE, lr=4e-3),
    "small": replace(BASE, preset="small"),
    "nodropout": replace(BASE, label_dropout=0.0),
    "alldata": replace(BASE, images=1497),  # every digit but the held-out ones
    "steps2x": replace(BASE, steps=1200),
    "steps4x": replace(BASE, steps=2400),
    "linear": replace(BASE, local_timesteps="linear"),
    "ema0.98": replace(BASE, ema_decay=0.98),
    "ema0": replace(BASE, ema_decay=0.0),
    "base+g2": replace(BASE, guidance_scale=2.0),
    "base+250": replace(BASE, inference_steps=250),
    "base+ddim": replace(BASE, scheduler="ddim"),
    "beta2": replace(BASE, adam_beta2=0.99),
    "emb10": replace(BASE, embedding_lr_scale=10.0),
    "tcurve": replace(BASE, draws="curriculum"),
    "tmix": replace(BASE, draws="mix"),
}


@contextlib.contextmanager
def screen_patches(setting: Setting) -> Iterator[None]:
    """The screen-only settings, for one training in this process: the trainer's optimizer and the client loss's
    t-draw are swapped for patched ones and put back after (the library keeps neither change: none won)."""
    saved = train_loop.make_optimizer, diffusion.sample_client_times

    def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        named = list(model.named_parameters())
        embedding = [p for n, p in named if n.startswith("class_embedding.")]
        rest = [p for n, p in named if not n.startswith("class_embedding.")]
        assert embedding, "the client model has no class embedding"
        groups: list[dict[str, Any]] = [{"params": rest}, {"params": embedding, "lr": lr * setting.embedding_lr_scale}]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, setting.adam_beta2), fused=True)

    draw, calls = saved[1], 0

    def sample_client_times(n: int, cut: int, generator: torch.Generator | None = None,
                            timesteps: LocalTimesteps = "uniform") -> torch.Tensor:
        nonlocal calls
        calls += 1  # one draw per training step (common/diffusion.py::client_loss)
        if setting.draws == "curriculum":
            return draw(n, cut, generator, "linear" if calls <= setting.steps // 2 else "uniform")
        return torch.cat([draw(n // 2, cut, generator, "linear"), draw(n - n // 2, cut, generator, "uniform")])

    if (setting.adam_beta2, setting.embedding_lr_scale) != (BASE.adam_beta2, BASE.embedding_lr_scale):
        train_loop.make_optimizer = make_optimizer
    if setting.draws != "fixed":
        diffusion.sample_client_times = sample_client_times
    try:
        yield
    finally:
        train_loop.make_optimizer, diffusion.sample_client_times = saved


def split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the client's shard, the held-out digits): a seeded shard of SHARD digits and 30 per class outside it."""
    _, labels = digits_arrays(MODE.side)
    order = np.random.default_rng(100 + seed).permutation(len(labels))
    rest = order[SHARD:]
    held = np.concatenate([rest[labels[rest] == c][:HELD_OUT_PER_CLASS] for c in range(10)])
    return order[:SHARD], held


def train_indices(setting: Setting, seed: int) -> np.ndarray:
    """The digits the client model trains on: its shard, or with more images than a shard, digits outside the
    held-out ones (never a held-out digit)."""
    shard, held = split(seed)
    if setting.images <= SHARD:
        return shard[: setting.images]
    return np.setdiff1d(np.arange(len(digits_arrays(MODE.side)[1])), held)[: setting.images]


def run_group(names: list[str], seed: int, work: Path) -> list[dict[str, Any]]:
    """Train one model for settings that differ only in sampling, finish the held-out hand-offs with each, score."""
    torch.set_num_threads(1)
    setting = SETTINGS[names[0]]
    images, labels = digits_arrays(MODE.side)
    schedule = ScheduleConfig()
    workdir = work / f"seed{seed}-{names[0]}"
    client = ClientSettings(cut=CUT, batch_size=setting.batch_size, train_steps=setting.steps, lr=setting.lr,
                            model_preset=setting.preset, label_dropout=setting.label_dropout,
                            local_timesteps=setting.local_timesteps, ema_decay=setting.ema_decay, seed=seed)
    index = train_indices(setting, seed)
    started = time.perf_counter()
    with screen_patches(setting):
        trained = train_local(images=torch.from_numpy(images[index]), labels=torch.from_numpy(labels[index]),
                              num_classes=10, image_shape=(1, MODE.side, MODE.side), schedule=schedule, cut=CUT,
                              fingerprint="client-half", workdir=workdir, settings=client, show_progress=False)
    seconds = time.perf_counter() - started
    assert trained.model_dir is not None
    model, _ = load_model(trained.model_dir)
    _, held = split(seed)
    x0, y = torch.from_numpy(images[held]), torch.from_numpy(labels[held])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_cut = q_sample(x0, torch.full((len(held),), CUT), noise, schedule.alphas_cumprod())
    rows = []
    for name in names:
        sampling = SETTINGS[name]
        chain = make_chain(schedule, sampling.scheduler, sampling.inference_steps, CUT)
        finished = client_half(as_denoiser(model, sampling.guidance_scale), chain, x_cut, y, seed=seed, cut=CUT)
        rows.append({"setting": name, "seed": seed, **score(finished, y), "train_seconds": round(seconds, 1),
                     "final_loss": float(np.mean([v for _, v in trained.losses[-50:]]))})
    return rows


@functools.cache
def study_evaluator() -> Evaluator:
    """The study's reference features and classifier, built once per process (the main one and each worker)."""
    return Evaluator(MODE, ROOT / "runs" / "cut_study" / MODE.name)


def score(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    evaluator = study_evaluator()
    requested = [str(int(v)) for v in labels]
    return {"fid": evaluator.fid(evaluator.features(images))["fid"],
            "accuracy": conditional_accuracy(evaluator.classifier, images.numpy(), requested, evaluator.heldout).accuracy}


def real_row(seed: int) -> dict[str, Any]:
    """The held-out digits themselves: a perfect client."""
    images, labels = digits_arrays(MODE.side)
    _, held = split(seed)
    return {"setting": "real", "seed": seed, **score(torch.from_numpy(images[held]), torch.from_numpy(labels[held]))}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    present = {r["setting"] for r in runs}
    for name in [n for n in ("real", *SETTINGS) if n in present]:
        rows = [r for r in runs if r["setting"] == name]
        for key in ("fid", "accuracy"):
            values = [r[key] for r in rows]
            summary.setdefault(name, {})[f"{key}_mean"] = round(float(np.mean(values)), 3)
            summary[name][f"{key}_std"] = round(float(np.std(values)), 3)
    return summary


def plot(summary: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), dpi=100)
    for ax, key, label in ((axes[0], "fid", "FID (lower is better)"), (axes[1], "accuracy", "conditional accuracy")):
        ax.bar(np.arange(len(names)), [summary[n][f"{key}_mean"] for n in names],
               yerr=[summary[n][f"{key}_std"] for n in names], capsize=3, color=["grey" if n == "real" else "C0" for n in names])
        ax.set_xticks(np.arange(len(names)), names, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].set_ylim(min(0.8, *(summary[n]["accuracy_mean"] - 0.02 for n in names)), 1.0)
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                        help=f"which settings (default: all of {', '.join(SETTINGS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="each seed: another shard and init")
    parser.add_argument("--workers", type=int, default=2, help="settings trained at once (one CPU thread each)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    # The reference features once, before the workers read them from the feature cache.
    study_evaluator()
    name = "client_half" + (f"-{args.tag}" if args.tag else "")
    runs = [real_row(seed) for seed in args.seeds]
    with tempfile.TemporaryDirectory(prefix="client-half-") as tmp, ProcessPoolExecutor(args.workers) as pool:
        # Settings that differ only in sampling share one trained model; the longest trainings start first.
        groups: dict[tuple[Any, ...], list[str]] = {}
        for n in args.settings:
            groups.setdefault(SETTINGS[n].training(), []).append(n)
        ordered = sorted(groups.values(), key=lambda names: -SETTINGS[names[0]].steps)
        futures = [pool.submit(run_group, names, seed, Path(tmp)) for seed in args.seeds for names in ordered]
        for future in tqdm(futures, desc="client models", unit="model"):
            runs.extend(future.result())
            log.warning("%s", future.result())
    summary = summarise(runs)
    for setting, row in summary.items():
        print(f"{setting:>10}: FID {row['fid_mean']:.2f} ± {row['fid_std']:.2f}   "
              f"accuracy {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}")
    path = write_result(name, {"cut": CUT, "shard": SHARD, "held_out": 10 * HELD_OUT_PER_CLASS, "seeds": args.seeds,
                               "settings": {n: asdict(SETTINGS[n]) for n in args.settings}, "summary": summary,
                               "runs": runs})
    plot(summary, path.with_suffix(".png"), f"one scarce client's model (180 digits, t <= {CUT}) finishing real "
         f"x_{CUT}: seeds {args.seeds}")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)} and its .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
