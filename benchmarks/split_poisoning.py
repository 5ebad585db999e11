"""One hostile split client against the server's check of each step on its own objective (issue 16).

Three class-partitioned clients on real 8x8 digits (tests/split_support.py, the harness of the split
outcome tests); client 2 (classes 7-9) attacks. Arms: no attack; gradient ascent (its true dL/d(eps_hat)
negated) at 1x and 4x its honest size, with the check off (``--split-trust-window 0``) and on; an adaptive
attacker that sends honest rows to bank credit and spends it on a 4x ascent step every fourth round; and
rows of honest size in a random direction. Scored: eps-MSE on held-out digits of the honest clients'
classes (0-6), true label and a wrong one, against what the two honest clients reach alone in process;
and the steps the server left out, per client.

    .venv/bin/python benchmarks/split_poisoning.py     # ~8 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the outcome harness of the tests
from bench_common import RESULTS, write_result
from split_support import ROUNDS, Digits, in_process, split_clients

log = logging.getLogger("collafuse.benchmarks.split_poisoning")
HONEST = (0, 1, 2, 3, 4, 5, 6)
Attack = Callable[[torch.Tensor, int], torch.Tensor]


def ascent(scale: float) -> Attack:
    return lambda rows, _round: -scale * rows


def adaptive(rows: torch.Tensor, round_: int) -> torch.Tensor:
    return -4.0 * rows if round_ % 4 == 3 else rows


def random_direction(rows: torch.Tensor, round_: int) -> torch.Tensor:
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(round_))
    return noise * (rows.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)


ARMS: dict[str, tuple[Attack | None, int | None]] = {  # name: (client 2's attack, --split-trust-window)
    "no attack": (None, None),
    "ascent 1x, check off": (ascent(1.0), 0),
    "ascent 1x": (ascent(1.0), None),
    "ascent 4x, check off": (ascent(4.0), 0),
    "ascent 4x": (ascent(4.0), None),
    "adaptive, check off": (adaptive, 0),
    "adaptive (bank, then 4x ascent)": (adaptive, None),
    "random direction": (random_direction, None),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default all)")
    parser.add_argument("--tag", default="", help="appended to the results' file name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    digits = Digits()
    alone = digits.eps_mse(in_process(digits, clients=(0, 1)), HONEST)
    rows: list[dict[str, Any]] = []
    for name, (attack, window) in tqdm([(a, ARMS[a]) for a in args.arms], desc="arms"):
        seen: dict[str, int] = {}

        def observe(server: Any, seen: dict[str, int] = seen) -> None:
            split = next(p for p in server.servicer.protocols.values() if p.name == "split")
            seen.update(split.contributions.left_out)

        settings = {} if window is None else {"split_trust_window": window}
        with tempfile.TemporaryDirectory() as tmp:
            model = split_clients(digits, Path(tmp), 3, attacks={2: attack} if attack else None, observe=observe,
                                  **settings)
        true_label, wrong_label = digits.eps_mse(model, HONEST)
        rows.append({"arm": name, "eps_mse_true_label": round(true_label, 4), "eps_mse_wrong_label": round(wrong_label, 4),
                     "vs_honest_alone": round(true_label / alone[0], 3), "left_out": dict(seen)})
        log.warning("%-34s eps-MSE %.4f (wrong label %.4f) = %.2fx the honest clients alone; left out %s",
                    name, true_label, wrong_label, true_label / alone[0], dict(seen))
    path = write_result("split_poisoning" + (f"-{args.tag}" if args.tag else ""), {
        "setup": {"clients": 3, "attacker": "client-2 (classes 7-9)", "rounds": ROUNDS, "images_per_step": 16,
                  "scored_on": "held-out digits of classes 0-6, t in (cut, 2 cut]"},
        "honest_alone_in_process": {"eps_mse_true_label": round(alone[0], 4), "eps_mse_wrong_label": round(alone[1], 4)},
        "arms": rows,
    })
    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.barh([r["arm"] for r in rows], [r["eps_mse_true_label"] for r in rows], color="tab:blue")
    axis.axvline(alone[0], color="black", linestyle="--", label="honest clients alone")
    axis.set_xscale("log")
    axis.set_xlabel("eps-MSE on the honest clients' classes (log)")
    axis.invert_yaxis()
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(RESULTS / path.name.replace(".json", ".png"), dpi=120)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
