"""The server's training core and sampler on a GPU against the same script on the CPU.

A paper-size denoiser (the ``paper`` preset: DDPM's CIFAR-10 UNet, 35.8 M parameters, 64x64x3 images)
trains through the server's own path (``TrainCore`` + the ambient source and loss, bf16 autocast where
the card supports it) and samples through the server's half of the chain (``common.sampling``). Per
device: training steps/s and images/s, sampling images/s and model evaluations/s, peak memory, the card's
name. The CPU runs a few steps only (it is there for the ratio, and to prove the script works anywhere).

    python benchmarks/gpu_server.py                         # cuda (when there is one), then cpu
    python benchmarks/gpu_server.py --devices cpu --cpu-steps 2 --cpu-sample-images 2   # a quick check
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from typing import Any

import torch
from bench_common import machine, write_result

from collafuse.common.config import ServerSettings, TrainOptions
from collafuse.common.models import as_denoiser, build_unet, count_parameters, null_label
from collafuse.common.sampling import make_chain, server_half
from collafuse.common.train_loop import TrainCore, seeded
from collafuse.server.protocols.ambient import ReleaseRows, ambient_source

log = logging.getLogger("collafuse.benchmarks.gpu_server")
RELEASES = 1024
CUT = 200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_device(
    device: torch.device, args: argparse.Namespace, steps: int, batch: int, images: int, inference: int
) -> dict[str, Any]:
    settings = ServerSettings(
        device=device.type, image_size=args.image_size, channels=3, model_preset=args.preset, batch_size=batch,
        mixed_precision=args.mixed_precision, seed=0,
    )
    shape = (3, args.image_size, args.image_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = seeded(0, lambda: build_unet(args.preset, shape, len(settings.classes)))
    core = TrainCore(model, TrainOptions.from_settings(settings), device)
    source = ambient_source(settings, None, device, null_label(core.model))
    gen = torch.Generator().manual_seed(1)
    source.take(ReleaseRows(torch.randn((RELEASES, *shape), generator=gen), torch.randint(10, (RELEASES,), generator=gen),
                            torch.full((RELEASES,), CUT), [], RELEASES, 1, 0), True)
    warmup = 2 if device.type == "cuda" else 1
    for _ in range(warmup):
        core.train_step(source.batch, source.loss)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        core.train_step(source.batch, source.loss)
    sync(device)
    train_s = time.perf_counter() - started

    chain = make_chain(settings.schedule(), "ddim", inference, 0)
    labels = torch.arange(images, device=device) % len(settings.classes)
    denoiser = as_denoiser(core.ema.model)
    with torch.no_grad():
        server_half(denoiser, chain, labels[:1], 0, 0, shape)  # warm-up (kernels, allocator)
        sync(device)
        started = time.perf_counter()
        server_half(denoiser, chain, labels, 0, 0, shape)
        sync(device)
    sample_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["processor"],
        "autocast": str(core.amp_dtype) if core.amp_dtype is not None else "off",
        "train_steps": steps, "batch": batch,
        "train_steps_per_s": steps / train_s, "train_images_per_s": steps * batch / train_s,
        "sample_images": images, "inference_steps": inference,
        "sample_images_per_s": images / sample_s, "sample_model_evals_per_s": images * inference / sample_s,
        "last_loss": core.losses[-1][1] if core.losses else None,
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    log.info("%s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cuda (when there is one), then cpu")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="GPU training minibatch")
    parser.add_argument("--cpu-batch", type=int, default=8, help="CPU training minibatch (a 64-image step of "
                        "this model takes minutes and 11.7 GB on a 2-core CPU)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "off"])
    parser.add_argument("--gpu-steps", type=int, default=50)
    parser.add_argument("--gpu-sample-images", type=int, default=256)
    parser.add_argument("--gpu-inference-steps", type=int, default=50)
    parser.add_argument("--cpu-steps", type=int, default=3)
    parser.add_argument("--cpu-sample-images", type=int, default=4)
    parser.add_argument("--cpu-inference-steps", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    runs = []
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda":
            runs.append(run_device(device, args, args.gpu_steps, args.batch, args.gpu_sample_images,
                                   args.gpu_inference_steps))
        else:
            runs.append(run_device(device, args, args.cpu_steps, args.cpu_batch, args.cpu_sample_images,
                                   args.cpu_inference_steps))
    shape = (3, args.image_size, args.image_size)
    payload: dict[str, Any] = {
        "preset": args.preset, "image_shape": list(shape),
        "parameters": count_parameters(build_unet(args.preset, shape, 10)), "runs": runs,
    }
    by = {r["device"].split(":")[0]: r for r in runs}
    if "cuda" in by and "cpu" in by:
        payload["gpu_over_cpu"] = {k: by["cuda"][k] / by["cpu"][k] for k in
                                   ("train_images_per_s", "sample_model_evals_per_s")}
    if any(r["device"].startswith("cuda") for r in runs):
        payload["gpu"] = torch.cuda.get_device_name(0)
    log.info("wrote %s", write_result("gpu_server", payload))


if __name__ == "__main__":
    main()
