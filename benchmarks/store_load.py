"""How long the server's trainer spends taking in releases over an upload campaign: the old full reload
on every acknowledged upload against loading only the rows that are new.

N clients each upload M releases in acknowledged calls of K items (every ack bumps the store version,
as the servicer's commits do); after every ack the trainer's training source refreshes, as the trainer
does before its next step. Both behaviours run side by side in one process on the same store, and a
forget at the end checks that the incremental source sees the deletion. Upload time is not counted.

    python benchmarks/store_load.py                     # 10 clients x 1,000 releases, calls of 100
    python benchmarks/store_load.py --clients 3 --releases 200 --per-call 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import machine

from collafuse.common.schedule import ScheduleConfig
from collafuse.server.protocols import store_tables
from collafuse.server.protocols.ambient import AmbientSource, NewRelease, ReleaseTable
from collafuse.server.store import ReleaseStore
from collafuse.v1 import collafuse_pb2

log = logging.getLogger("collafuse.benchmarks.store_load")
RESULTS = Path(__file__).resolve().parent / "results"


def campaign(root: Path, clients: int, releases: int, per_call: int, side: int) -> dict[str, Any]:
    store = ReleaseStore(root, store_tables())
    table = ReleaseTable(store)
    alphas_cumprod = ScheduleConfig().alphas_cumprod()
    sources = {
        name: AmbientSource(table, alphas_cumprod, batch_size=64, label_dropout=0.1, null_label=10,
                            device=torch.device("cpu"), incremental=incremental)
        for name, incremental in (("full_reload", False), ("incremental", True))
    }
    seconds = dict.fromkeys(sources, 0.0)
    rng = np.random.default_rng(0)
    acks = 0
    for c in range(clients):
        client = f"client-{c:02d}"
        store.register_client(client, 200, collafuse_pb2.PROTOCOL_AMBIENT, [str(i) for i in range(10)], "fp")
        for start in range(0, releases, per_call):
            n = min(per_call, releases - start)
            x = rng.standard_normal((n, 1, side, side), dtype=np.float32)
            table.add(client, 200, [NewRelease.of(f"{client}-{start + i}", i % 10, torch.from_numpy(x[i])) for i in range(n)])
            acks += 1
            for name, source in sources.items():
                tic = time.perf_counter()
                source.refresh()
                seconds[name] += time.perf_counter() - tic
    total = clients * releases
    for source in sources.values():
        assert len(source) == total
    assert torch.equal(sources["full_reload"].x_cut, sources["incremental"].x_cut), "both see the same release set"
    # A forget must reach the incremental source too (it reloads everything once).
    store.forget("client-00")
    forget_seconds = {}
    for name, source in sources.items():
        tic = time.perf_counter()
        source.refresh()
        forget_seconds[name] = time.perf_counter() - tic
        assert len(source) == total - releases and "client-00" not in source.client_ids
    store.close()
    return {
        "acks": acks,
        "releases": total,
        "bytes_per_release": 4 * side * side,
        "refresh_seconds": {k: round(v, 4) for k, v in seconds.items()},
        "rows_read": {name: s.rows_loaded - (total - releases) for name, s in sources.items()},
        "speedup": round(seconds["full_reload"] / max(seconds["incremental"], 1e-9), 1),
        "forget_refresh_seconds": {k: round(v, 4) for k, v in forget_seconds.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--releases", type=int, default=1000, help="releases per client")
    parser.add_argument("--per-call", type=int, default=100, help="releases per acknowledged Release call")
    parser.add_argument("--side", type=int, default=16, help="image side (grey, float32)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = campaign(Path(tmp), args.clients, args.releases, args.per_call, args.side)
    record = {
        "benchmark": "store_load",
        "date": dt.date.today().isoformat(),
        "settings": {"clients": args.clients, "releases_per_client": args.releases, "per_call": args.per_call,
                     "image": f"{args.side}x{args.side}x1 float32"},
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"store_load-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
