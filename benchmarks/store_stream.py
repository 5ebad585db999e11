"""Server memory and training step time as the release store grows: every release in memory (the default)
against ``--train-from-store`` (row ids in memory, each minibatch read from the store through an LRU cache).

For each store size N (synthetic 8x8 grey releases of 10 clients) a fresh process per source builds the
ambient training source, refreshes it and trains the tiny UNet for a few steps; it reports its peak RSS
and the mean step time. The two sources run on the same store, one after the other, so the step-time
ratio is measured side by side.

    .venv/bin/python benchmarks/store_stream.py                          # N = 10k, 100k, 1M (~10 minutes)
    .venv/bin/python benchmarks/store_stream.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import write_result
from tqdm import tqdm

from collafuse.common.config import ServerSettings
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import NewRelease, ReleaseTable
from collafuse.server.store import ReleaseStore
from collafuse.v1 import collafuse_pb2

log = logging.getLogger("collafuse.benchmarks.store_stream")
CLIENTS, SIDE, STEPS, BATCH = 10, 8, 30, 64


def fill(root: Path, n: int) -> None:
    store = ReleaseStore(root, store_tables())
    table = ReleaseTable(store)
    rng = np.random.default_rng(0)
    per_client = n // CLIENTS
    with tqdm(total=n, desc=f"filling {n:,} releases", unit="rows") as bar:
        for c in range(CLIENTS):
            client = f"client-{c}"
            store.register_client(client, 200, collafuse_pb2.PROTOCOL_AMBIENT, [str(k) for k in range(10)], "fp")
            for start in range(0, per_client, 20_000):
                count = min(20_000, per_client - start)
                x = rng.standard_normal((count, 1, SIDE, SIDE), dtype=np.float32)
                table.add(client, 200, [NewRelease.of(f"{start + i}", (start + i) % 10, torch.from_numpy(x[i]))
                                        for i in range(count)])
                bar.update(count)


def child(root: Path, from_store: bool) -> dict[str, Any]:
    """One source in this process: peak RSS and the mean training step time."""
    from collafuse.common.config import TrainOptions
    from collafuse.common.models import build_unet, null_label
    from collafuse.common.train_loop import TrainCore, seeded
    from collafuse.server.protocols.ambient import ambient_source

    torch.set_num_threads(1)
    settings = ServerSettings(store=root, image_size=SIDE, channels=1, classes=[str(k) for k in range(10)],
                              model_preset="tiny", batch_size=BATCH, train_from_store=from_store,
                              train_cache_rows=4096)
    store = ReleaseStore(root, store_tables())
    core = TrainCore(seeded(0, lambda: build_unet("tiny", (1, SIDE, SIDE), 10)), TrainOptions(), torch.device("cpu"))
    source = ambient_source(settings, ReleaseTable(store), torch.device("cpu"), null_label(core.model))
    started = time.perf_counter()
    source.refresh()
    load_s = time.perf_counter() - started
    core.train_step(source.batch, source.loss)  # warm-up
    started = time.perf_counter()
    for _ in range(STEPS):
        core.train_step(source.batch, source.loss)
    step_s = (time.perf_counter() - started) / STEPS
    return {"source": "store" if from_store else "memory", "releases": len(source), "load_s": round(load_s, 3),
            "step_ms": round(1000 * step_s, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--child", nargs=2, metavar=("STORE", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1] == "store")))
        return 0
    logging.basicConfig(level=logging.INFO)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            fill(Path(tmp), n)
            runs = {}
            for source in ("memory", "store"):
                out = subprocess.run([sys.executable, __file__, "--child", tmp, source], capture_output=True,
                                     text=True, check=True)
                runs[source] = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"releases": n, **{f"{k}_{s}": v for s, r in runs.items() for k, v in r.items()
                                     if k not in ("source", "releases")},
                   "step_time_store_over_memory": round(runs["store"]["step_ms"] / runs["memory"]["step_ms"], 3)}
            log.info("%s", row)
            rows.append(row)
    path = write_result("store_stream", {"setup": {"clients": CLIENTS, "release_shape": [1, SIDE, SIDE],
                                                   "batch_size": BATCH, "steps": STEPS, "cache_rows": 4096,
                                                   "model": "tiny UNet, CPU, 1 thread"}, "sizes": rows})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
