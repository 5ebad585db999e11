"""Larger colour images through the latent path (issue 18): 64x64 RGB crops of scikit-learn's two sample
photographs (``collafuse-data photos``), a small AutoencoderKL trained on crops of another seed (the
operator's public data, not the clients'), then ``collafuse-sim --autoencoder`` with two clients at tiny
budgets. Copies the decoded sample grids (hand-off row included) and a summary to ``benchmarks/results``.

    .venv/bin/python benchmarks/latent_photos.py               # ~15 minutes on 2 CPU cores
    .venv/bin/python benchmarks/latent_photos.py --ae-steps 60 --steps 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import RESULTS, write_result

log = logging.getLogger("collafuse.benchmarks.latent_photos")
BIN = Path(sys.executable).parent


def run(*command: str) -> float:
    started = time.perf_counter()
    log.info("$ %s", " ".join(command))
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ae-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150, help="server training steps")
    parser.add_argument("--client-steps", type=int, default=150)
    parser.add_argument("--per-class", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        times = {
            "clients_data_s": run(str(BIN / "collafuse-data"), "photos", str(root / "photos"), "--per-class",
                                  str(args.per_class), "--seed", "0"),
            "operator_data_s": run(str(BIN / "collafuse-data"), "photos", str(root / "public"), "--per-class",
                                   str(args.per_class), "--seed", "1"),
        }
        times["autoencoder_train_s"] = run(str(BIN / "collafuse-autoencoder"), "train", "--data", str(root / "public"),
                                           "--out", str(root / "ae"), "--steps", str(args.ae_steps),
                                           "--batch-size", "16")
        ae_report = json.loads((root / "ae" / "autoencoder_training.json").read_text())
        times["sim_s"] = run(str(BIN / "collafuse-sim"), "--dataset", str(root / "photos"), "--autoencoder",
                             str(root / "ae"), "--clients", "2", "--partition", "classes", "--steps", str(args.steps),
                             "--client-steps", str(args.client_steps), "--batch-size", "16", "--cut", "200",
                             "--samples-per-class", "4", "--inference-steps", "50", "--out", str(root / "sim"))
        today = dt.date.today().isoformat()
        grids = []
        for k, grid in enumerate(sorted((root / "sim").glob("**/samples/grid.png"))):
            target = RESULTS / f"latent_photos-{today}-client{k}-grid.png"
            shutil.copyfile(grid, target)
            grids.append(target.name)
        pooled = json.loads((root / "sim" / "metrics.json").read_text()).get("pooled", {})
    path = write_result("latent_photos", {
        "images": "64x64 RGB crops of sklearn's china.jpg and flower.jpg (one class each)", "clients": 2,
        "partition": "classes", "cut": 200, "server_steps": args.steps, "client_steps": args.client_steps,
        "autoencoder": {k: ae_report.get(k) for k in ("heldout_psnr", "image_shape", "latent_shape", "latent_std",
                                                       "scaling_factor", "steps", "seconds")},
        "seconds": times, "grids": grids, "sim_pooled": pooled,
    })
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
