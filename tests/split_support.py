"""The split-learning outcome harness shared by the quality and poisoning tests: real digits in three
class-partitioned shards, an in-process reference, and split clients over gRPC against a real server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from server_support import start, stub
from sklearn.datasets import load_digits

from collafuse.client.dp import privatize
from collafuse.client.protocols.split import forward_request, loss_gradient, noise_batch
from collafuse.common.codec import decode, encode
from collafuse.common.models import build_unet
from collafuse.common.schedule import ScheduleConfig
from collafuse.common.train_loop import make_optimizer, seeded
from collafuse.v1 import collafuse_pb2

T, CUT = 1000, 200
ROUNDS, PER_CLIENT = 100, 16
GROUPS = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
CLASSES = [str(c) for c in range(10)]
ALPHAS = ScheduleConfig(num_train_timesteps=T).alphas_cumprod()
FLOOR = float(ALPHAS[CUT])
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x0, t, labels, eps


class Digits:
    def __init__(self) -> None:
        digits = load_digits()
        self.x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # 0..16 -> [-1, 1]
        self.y = torch.tensor(digits.target)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(0))
        self.held_out, train = order[:300], order[300:]
        self.shards = [train[torch.isin(self.y[train], torch.tensor(group))] for group in GROUPS]

    def batch(self, client: int, round_: int) -> Batch:
        g = torch.Generator().manual_seed(1000 * client + round_)
        shard = self.shards[client]
        idx = shard[torch.randint(len(shard), (PER_CLIENT,), generator=g)]
        t = torch.randint(CUT + 1, T + 1, (PER_CLIENT,), generator=g)
        return self.x[idx], t, self.y[idx], torch.randn((PER_CLIENT, 1, 8, 8), generator=g)

    def round_batch(self, round_: int, clients: tuple[int, ...] = tuple(range(len(GROUPS)))) -> Batch:
        parts = [self.batch(k, round_) for k in clients]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]

    def eps_mse(self, model: torch.nn.Module, classes: tuple[int, ...] | None = None) -> tuple[float, float]:
        """eps-MSE on held-out digits at t in (cut, 2 cut]: with the true label, and with a wrong one (of
        ``classes`` only, when given: both the digits and the wrong labels)."""
        g = torch.Generator().manual_seed(7)
        x0, y = self.x[self.held_out], self.y[self.held_out]
        kinds = torch.tensor(classes if classes is not None else range(10))
        keep = torch.isin(y, kinds)
        x0, y = x0[keep], y[keep]
        t = torch.randint(CUT + 1, 2 * CUT + 1, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        position = (y[:, None] == kinds[None]).int().argmax(dim=1)
        wrong = kinds[(position + 1 + torch.randint(len(kinds) - 1, y.shape, generator=g)) % len(kinds)]
        x_t = noise_batch(x0, t, y, eps, ALPHAS, CUT).x_t
        with torch.no_grad():
            return tuple(float((model(x_t, t - 1, class_labels=labels).sample - eps).pow(2).mean())  # type: ignore[return-value]
                         for labels in (y, wrong))


def fresh_model() -> torch.nn.Module:
    """The server's initial weights (its seed 0, 8x8 grey, ten classes)."""
    return seeded(0, lambda: build_unet("tiny", (1, 8, 8), len(CLASSES)))


def in_process(digits: Digits, clients: tuple[int, ...] = tuple(range(len(GROUPS)))) -> torch.nn.Module:
    """Plain autograd, one AdamW step per round batch of ``clients``: what split learning should equal."""
    model = fresh_model().train()
    optimizer = make_optimizer(model, 2e-3)
    for r in range(ROUNDS):
        x0, t, y, eps = digits.round_batch(r, clients)
        x_t = noise_batch(x0, t, y, eps, ALPHAS, CUT).x_t
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x_t, t - 1, class_labels=y).sample, eps).backward()
        optimizer.step()
    return model


# What a hostile client sends instead of its gradient rows: (its honest rows, the round) -> rows.
Attack = Callable[[torch.Tensor, int], torch.Tensor]


def split_clients(digits: Digits, tmp_path: Path, clients: int, dp: tuple[float, float] | None = None,
                  attacks: dict[int, Attack] | None = None, observe: Callable[[Any], None] | None = None,
                  **server_settings: Any) -> torch.nn.Module:
    """A real server over gRPC; ``clients`` threads, each sending its batches as split steps (``dp``: each image's
    gradient row clipped to C and noised with sigma*C on the client, as --dp-clip C --dp-noise-multiplier sigma;
    ``attacks``: client k sends ``attacks[k](rows, round)`` instead). ``observe`` sees the server before it stops."""
    tag = f"{clients}-dp" if dp else str(clients)
    server = start(tmp_path / f"store-{tag}", start_trainer=False, image_size=8, classes=CLASSES,
                   num_train_timesteps=T, label_dropout=0.0, max_steps=ROUNDS, split_round_timeout=120.0,
                   checkpoint_every=10_000, **server_settings)
    draw: Callable[[int, int], Batch] = (lambda k, r: digits.round_batch(r)) if clients == 1 else digits.batch
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            api, client_id = stub(server), f"client-{k}"
            noise = torch.Generator().manual_seed(50 + k)
            api.Register(collafuse_pb2.RegisterRequest(client_id=client_id, cut=CUT, class_names=CLASSES,
                                                       protocol=collafuse_pb2.PROTOCOL_SPLIT), timeout=30)
            for r in range(ROUNDS):
                batch = noise_batch(*draw(k, r), ALPHAS, CUT)  # type: ignore[misc]
                reply = api.SplitForward(forward_request(client_id, batch, CUT, FLOOR, ALPHAS), timeout=120)
                if reply.done:  # the server reached max_steps
                    return
                rows, loss = loss_gradient(decode(reply.eps_hat), batch.eps)
                if dp is not None:
                    rows = privatize(rows, dp[0], dp[1], noise)
                if attacks and k in attacks:
                    rows = attacks[k](rows, r)
                api.SplitBackward(collafuse_pb2.SplitBackwardRequest(
                    client_id=client_id, step_id=reply.step_id, grad=encode(rows / rows.shape[0]), loss=loss,
                    last=r == ROUNDS - 1), timeout=120)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert not errors, errors
        # One step per round; a round all of whose steps the server's check left out makes none.
        assert 0.9 * ROUNDS <= server.trainer.core.step <= ROUNDS, server.trainer.core.step
        if observe is not None:
            observe(server)
        return server.trainer.core.model
    finally:
        server.stop(0)


