"""What the distribution costs, each against one process, side by side.

- ``train``: the real server Trainer (ambient loss on a store of releases, its thread, EMA, fused AdamW)
  against a plain single-process diffusers loop (UNet2DModel, DDPMScheduler.add_noise, AdamW, EMAModel)
  on the same images, model and batch; steps/s of each and the ratio (target >= 0.95).
- ``sample``: collaborative sampling (an in-process server over loopback gRPC, then the client's half)
  against ``handoff_sample`` in one process with the same chain and models; the ratio of times (target
  <= 1.05) and the largest difference of the images (they must agree).
- ``codec``: ``common.codec`` encode + decode (with the server's checks) against a plain copy of the same
  bytes, and Release throughput over loopback gRPC (MB/s of x_cut payload).
- ``client``: the client's seconds per generated image at cuts 100, 200, 500 against ICM (cut = T),
  beside the expected fraction (client steps / all steps, ~ cut / T).

Arms alternate (A, B, A, B, ...) and the best round of each is kept: the machine is shared. ``train`` also
reports the median of the per-round ratios (each round's two arms ran back to back under about the same load).

    python benchmarks/distribution_cost.py                    # all four
    python benchmarks/distribution_cost.py --only codec client --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import write_result
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from collafuse.client.connection import ServerConnection
from collafuse.common.codec import decode, encode
from collafuse.common.config import ServerSettings
from collafuse.common.diffusion import release
from collafuse.common.models import as_denoiser, build_unet
from collafuse.common.sampling import client_half, handoff_sample, make_chain, server_half
from collafuse.common.train_loop import seeded
from collafuse.server.app import build_server
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import NewRelease, ReleaseTable
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.v1 import collafuse_pb2

log = logging.getLogger("collafuse.benchmarks.distribution_cost")
CPU = torch.device("cpu")
CLASSES = [str(i) for i in range(10)]


def settings_for(root: Path, args: argparse.Namespace, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "store": root, "device": "cpu", "image_size": args.image_size,
        "channels": 1, "classes": CLASSES, "model_preset": args.preset, "batch_size": args.batch,
        "max_steps": args.steps, "checkpoint_every": 10**6, "seed": 0, "log_level": "WARNING",
        "max_sample_images": 4096,
    }
    return ServerSettings(**{**values, **overrides})


def alternate(
    rounds: int, arms: dict[str, Callable[[], float]], every: dict[str, list[float]] | None = None
) -> dict[str, float]:
    """Best (smallest) seconds of each arm over ``rounds`` alternating rounds (all of them into ``every``)."""
    best = {name: float("inf") for name in arms}
    for r in range(rounds):
        for name, arm in arms.items():
            seconds = arm()
            best[name] = min(best[name], seconds)
            if every is not None:
                every.setdefault(name, []).append(seconds)
            log.info("round %d %s: %.3fs (load average %.1f)", r, name, seconds, os.getloadavg()[0])
    return best


# ---- 1. training throughput ---------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict[str, Any]:
    shape = (1, args.image_size, args.image_size)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((args.images, *shape), generator=gen) * 2 - 1
    labels = torch.randint(len(CLASSES), (args.images,), generator=gen)
    cut = 200

    def trainer_arm() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            settings = settings_for(Path(tmp), args)
            store = ReleaseStore(Path(tmp), store_tables())
            store.register_client("c0", cut, collafuse_pb2.PROTOCOL_AMBIENT, CLASSES, "fp")
            x_cut = release(x0, list(range(args.images)), cut, settings.schedule().alphas_cumprod())
            ReleaseTable(store).add("c0", cut, [NewRelease.of(f"k{i}", int(labels[i]), x_cut[i]) for i in range(args.images)])
            trainer = Trainer(settings, store, "fp", device=CPU, poll_interval=0.01, log_every=10**6)
            trainer.start()
            assert trainer.wait_done(3600)
            trainer.stop()
            store.close()
            # Training time as the trainer counts it: from the first step to the last, no waiting, no checkpoint.
            return trainer._run_time * args.steps / trainer._run_steps

    def plain_arm() -> float:
        model = seeded(0, lambda: build_unet(args.preset, shape, len(CLASSES)))
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        ema = EMAModel(model.parameters(), decay=0.995)
        g = torch.Generator().manual_seed(1)
        started = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(args.images, (args.batch,), generator=g)
            noise = torch.randn((args.batch, *shape), generator=g)
            t = torch.randint(0, 1000, (args.batch,), generator=g)
            noisy = scheduler.add_noise(x0[idx], noise, t)  # type: ignore[attr-defined]
            loss = torch.nn.functional.mse_loss(model(noisy, t, class_labels=labels[idx]).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.step(model.parameters())
        return time.perf_counter() - started

    every: dict[str, list[float]] = {}
    loads = [os.getloadavg()[0]]
    best = alternate(args.rounds, {"plain_diffusers": plain_arm, "server_trainer": trainer_arm}, every)
    loads.append(os.getloadavg()[0])
    # Each round's two arms ran back to back under about the same load: their ratios are paired samples.
    paired = [p / t for p, t in zip(every["plain_diffusers"], every["server_trainer"])]
    return {
        "steps": args.steps, "batch": args.batch, "preset": args.preset, "image_shape": list(shape),
        "threads": args.threads, "steps_per_s": {k: args.steps / v for k, v in best.items()},
        "ratio_trainer_over_plain": best["plain_diffusers"] / best["server_trainer"], "target": ">= 0.95",
        "round_seconds": every, "paired_ratios": paired, "paired_ratio_median": statistics.median(paired),
        "load_average_1m_start_end": loads,
        "plain_loop_omits": "label drop-out, the ambient re-noise from the cut and its weight c, the lr schedule, "
                            "the non-finite-loss check; uses unfused AdamW (the trainer: fused)",
    }


# ---- 2. collaborative sampling ------------------------------------------------------------------
def sample(args: argparse.Namespace) -> dict[str, Any]:
    shape = (1, args.image_size, args.image_size)
    cut, n = 200, args.sample_images
    with tempfile.TemporaryDirectory() as tmp:
        server = build_server(settings_for(Path(tmp), args), start_trainer=False)
        try:
            connection = ServerConnection(server.address)
            info = connection.register("bench", cut, "ambient", CLASSES)
            client_model = seeded(1, lambda: build_unet("tiny", shape, len(CLASSES))).eval()
            server_model = server.trainer.ema_snapshot()[1]
            chain = make_chain(info.schedule, "ddim", args.inference_steps, cut)
            labels = torch.arange(n) % len(CLASSES)
            request = collafuse_pb2.SampleRequest(client_id="bench", labels=labels.tolist(), seed=3, cut=cut,
                                                  num_inference_steps=args.inference_steps, scheduler="ddim",
                                                  guidance_scale=1.0)
            outputs: dict[str, torch.Tensor] = {}

            def grpc_arm() -> float:
                started = time.perf_counter()
                result = connection.sample(request, shape)
                with torch.no_grad():
                    outputs["grpc"] = client_half(as_denoiser(client_model), chain, result.x_cut, labels, 3, cut)
                return time.perf_counter() - started

            def local_arm() -> float:
                started = time.perf_counter()
                with torch.no_grad():
                    outputs["local"] = handoff_sample(as_denoiser(server_model), as_denoiser(client_model), chain,
                                                    labels, 3, cut, shape)[1]
                return time.perf_counter() - started

            best = alternate(args.rounds, {"single_process": local_arm, "grpc_split": grpc_arm})
        finally:
            server.stop(1.0)
    diff = float((outputs["grpc"] - outputs["local"]).abs().max())
    return {
        "images": n, "inference_steps": args.inference_steps, "cut": cut, "server_preset": args.preset,
        "client_preset": "tiny", "seconds": best, "ratio_grpc_over_single": best["grpc_split"] / best["single_process"],
        "target": "<= 1.05", "max_abs_difference": diff,
    }


# ---- 4. codec and release throughput ------------------------------------------------------------
def copy_seconds(tensor: torch.Tensor, repeats: int) -> float:
    buffer = tensor.numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        np.copy(buffer)
    return (time.perf_counter() - started) / repeats


def codec_seconds(tensor: torch.Tensor, repeats: int, checked: bool) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        message = encode(tensor)
        if checked:  # what the server does to a release: dtype, shape, finiteness, range
            decode(message, shape=tuple(tensor.shape), finite=True, value_range=(-50.0, 50.0))
        else:
            decode(message, finite=False)
    return (time.perf_counter() - started) / repeats


def codec(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {"one_64x64x3": (1, 3, 64, 64), "batch_64x64x64x3": (64, 3, 64, 64), "64MiB": (16, 1024, 1024)}
    rows: dict[str, Any] = {}
    for name, size in sizes.items():
        tensor = torch.randn(size)
        mb = tensor.numel() * 4 / 1e6
        repeats = max(3, int(200 / mb)) if mb < 50 else 5
        best = alternate(args.rounds, {
            "memcpy": lambda t=tensor, r=repeats: copy_seconds(t, r),  # type: ignore[misc]
            "encode_decode": lambda t=tensor, r=repeats: codec_seconds(t, r, checked=False),  # type: ignore[misc]
            "encode_decode_checked": lambda t=tensor, r=repeats: codec_seconds(t, r, checked=True),  # type: ignore[misc]
        })
        rows[name] = {"mb": mb, "mb_per_s": {k: mb / v for k, v in best.items()},
                      "codec_over_memcpy_time": best["encode_decode"] / best["memcpy"]}
    rows["release_grpc"] = release_throughput(args)
    return rows


def release_throughput(args: argparse.Namespace) -> dict[str, Any]:
    side, cut, per_chunk = 64, 200, 32
    shape = (3, side, side)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp), args, image_size=side, channels=3, model_preset="tiny")
        server = build_server(settings, start_trainer=False)
        try:
            connection = ServerConnection(server.address)
            x = torch.randn((per_chunk, *shape)).clamp(-4, 4)
            best = float("inf")
            for r in range(args.rounds):
                client = f"bench{r}"
                connection.register(client, cut, "ambient", CLASSES)

                def chunks(client: str = client) -> list[collafuse_pb2.ReleaseChunk]:
                    return [collafuse_pb2.ReleaseChunk(client_id=client, cut=cut, items=[
                        collafuse_pb2.ReleaseItem(image_key=f"{c}-{i}", label=i % 10, x_cut=encode(x[i]))
                        for i in range(per_chunk)]) for c in range(args.release_chunks)]

                started = time.perf_counter()
                connection.release(lambda client=client: iter(chunks(client)))  # type: ignore[misc]
                best = min(best, time.perf_counter() - started)
        finally:
            server.stop(1.0)
    images = per_chunk * args.release_chunks
    mb = images * x[0].numel() * 4 / 1e6
    return {"images": images, "image_shape": list(shape), "mb": mb, "seconds": best, "mb_per_s": mb / best,
            "images_per_s": images / best, "note": "includes encoding, validation and the SQLite commit"}


# ---- 5. client compute per image vs ICM ---------------------------------------------------------
def client(args: argparse.Namespace) -> dict[str, Any]:
    shape = (1, args.image_size, args.image_size)
    schedule = settings_for(Path("."), args).schedule()
    model = seeded(1, lambda: build_unet("tiny", shape, len(CLASSES))).eval()
    denoiser = as_denoiser(model)
    labels = torch.arange(args.sample_images) % len(CLASSES)
    T = schedule.num_train_timesteps
    cuts = [100, 200, 500, T]
    chains = {c: make_chain(schedule, "ddim", args.inference_steps, c) for c in cuts}
    x_T = server_half(denoiser, chains[T], labels, 0, T, shape)  # cut T: the initial noise, no evaluations

    def arm(cut: int) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                client_half(denoiser, chains[cut], x_T, labels, 0, cut)  # from noise: the same work as from x_hat_cut
            return (time.perf_counter() - started) / args.sample_images
        return run

    best = alternate(args.rounds, {str(c): arm(c) for c in cuts})
    icm = best[str(T)]
    return {
        "inference_steps": args.inference_steps, "client_preset": "tiny", "images": args.sample_images,
        "per_cut": {str(c): {"seconds_per_image": best[str(c)], "client_steps": chains[c].evaluations(c)[1],
                             "fraction_of_icm": best[str(c)] / icm, "expected_fraction": chains[c].evaluations(c)[1] /
                             chains[T].evaluations(T)[1], "cut_over_T": c / T} for c in cuts},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=["train", "sample", "codec", "client"],
                        default=["train", "sample", "codec", "client"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="small", help="server model preset")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="training steps per round")
    parser.add_argument("--images", type=int, default=512, help="training images (releases)")
    parser.add_argument("--sample-images", type=int, default=32)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--release-chunks", type=int, default=8, help="Release stream chunks of 32 64x64x3 images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("collafuse").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    runs = {"train": train, "sample": sample, "codec": codec, "client": client}
    payload: dict[str, Any] = {"args": vars(args)}
    for name in args.only:
        payload[name] = runs[name](args)
        log.info("%s: %s", name, payload[name])
    suffix = "" if len(args.only) == 4 else "-" + "-".join(args.only)
    log.info("wrote %s", write_result("distribution_cost" + suffix, payload))


if __name__ == "__main__":
    main()
