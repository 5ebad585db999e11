"""Sample fairness by work (issue 16): a small request waits about one model batch behind clients that flood the
queue with full batches, not one batch per flooding client (the issue: a 4-image request waited one 256-image
batch per flooder and missed its 60 s deadline)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from collafuse.common.models import build_unet
from collafuse.common.schedule import ScheduleConfig
from collafuse.server.sampler import HandOff, SampleJob, Sampler, SamplingLimits

torch.set_num_threads(1)
SHAPE = (1, 8, 8)
STEPS = 2


def job(n: int, seed: int) -> SampleJob:
    return SampleJob(labels=[0] * n, seed=seed, num_inference_steps=STEPS, kind="ddpm", guidance_scale=1.0, cut=0)


@pytest.mark.parametrize("cross_client", [False, True])
def test_a_small_request_runs_next_behind_a_flood(cross_client: bool) -> None:
    model = build_unet("tiny", SHAPE, 3).eval()
    sampler = Sampler(ScheduleConfig(num_train_timesteps=50), SHAPE, lambda: (0, model), torch.device("cpu"),
                      SamplingLimits(workers=1, per_client=4, total=32, max_batch=16, max_wait_s=0.0,
                                     cross_client=cross_client))
    leaders: list[list[str]] = []
    gate = threading.Event()
    real_run = sampler._run

    def recorded(batch: list[Any]) -> None:
        leaders.append([piece.ticket.client_id for piece in batch])
        if len(leaders) == 1:
            gate.wait(30)  # hold the first batch while the others queue up
        real_run(batch)

    sampler._run = recorded  # type: ignore[method-assign]
    try:
        floods = [sampler.submit(f"flood-{k}", sampler.plan(job(64, k))) for k in range(3)]  # 4 full pieces each
        while not leaders:
            threading.Event().wait(0.01)
        small = sampler.submit("small", sampler.plan(job(2, 99)))
        gate.set()
        for ticket in (small, *floods):
            while True:
                item = ticket.events.get(timeout=60)
                if isinstance(item, HandOff):
                    break
                assert not isinstance(item, BaseException), item
    finally:
        sampler.close()
        sampler.join(10)
    runs = [batch[0] for batch in leaders]
    # The batch that was running when it came, then the small request: not behind one batch per flooder.
    assert runs.index("small") == 1, runs
    assert len(runs) == 13 and sorted(runs[1:]).count("small") == 1
    # The floods still share the rest evenly: no flooder runs twice before each other one ran once.
    flood_order = [c for c in runs if c != "small"]
    for start in range(0, 12, 3):
        assert len(set(flood_order[start:start + 3])) == 3, flood_order
