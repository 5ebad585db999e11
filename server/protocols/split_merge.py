"""Cross-client batching of split forward passes: concurrent SplitForward calls of different clients that saw
the same model version run as one model call, up to a maximum batch and wait, and are split back per client.

No thread of its own: the first caller of a group leads it. It waits up to ``max_wait_s`` for others to join,
runs the merged batch on the group's frozen weights and hands every member its rows. It waits only while
another client has sent a forward within ``ACTIVE_WINDOW_S``, so a lone client never pays the wait.

eps_hat of an image depends on that image only (the UNet has no batch-coupled layer: GroupNorm normalises
each image by itself, dropout is 0), so a client's eps_hat does not change by riding in another's batch,
beyond the float rounding of a different batch size (``tests/test_split_merge.py``). A backward recomputes
the forward on the client's own rows, as without merging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

# A client that sent a forward this recently is likely to send another soon: worth waiting for.
ACTIVE_WINDOW_S = 5.0


class FrozenDenoiser(Protocol):
    """What a group runs on: one model version's frozen weights (``split.WeightStash``)."""

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class _Member:
    x_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class _Group:
    weights: FrozenDenoiser
    members: list[_Member]
    images: int
    closed: bool = False


class ForwardMerger:
    """Merges concurrent forwards on the same frozen weights into one model call (thread-safe)."""

    def __init__(self, max_batch: int = 256, max_wait_s: float = 0.005, clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("ForwardMerger needs max_batch >= 1 and max_wait_s >= 0")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._cv = threading.Condition()
        self._open: dict[int, _Group] = {}  # by id() of the weights: one open group per model version
        self._last_seen: dict[str, float] = {}
        self.calls = 0  # model calls made
        self.forwards = 0  # forwards answered
        self.merged = 0  # forwards that rode in another client's call

    def eps_hat(self, client_id: str, weights: FrozenDenoiser, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """eps_hat(x_t, t, y) on ``weights`` (float32, on the CPU), computed alone or in a merged batch."""
        member = _Member(x_t, t, labels)
        n = int(x_t.shape[0])
        with self._cv:
            self.forwards += 1
            group = self._open.get(id(weights))
            if group is not None and not group.closed and group.weights is weights and group.images + n <= self.max_batch:
                group.members.append(member)
                group.images += n
                self.merged += 1
                if group.images >= self.max_batch:
                    group.closed = True
                    self._cv.notify_all()
                self._seen(client_id)
            else:
                group = _Group(weights, [member], n, closed=not self._worth_waiting(client_id, n))
                if not group.closed:
                    self._open[id(weights)] = group
                self._seen(client_id)
                self._lead(group)
                return self._answer(member)
        member.done.wait()
        return self._answer(member)

    def _seen(self, client_id: str) -> None:
        now = self._clock()
        self._last_seen[client_id] = now
        for stale in [c for c, seen in self._last_seen.items() if now - seen > ACTIVE_WINDOW_S]:
            del self._last_seen[stale]  # bounded by the clients active in the window

    def _worth_waiting(self, client_id: str, images: int) -> bool:
        now = self._clock()
        others = any(c != client_id and now - seen <= ACTIVE_WINDOW_S for c, seen in self._last_seen.items())
        return others and self.max_wait_s > 0 and images < self.max_batch

    def _lead(self, group: _Group) -> None:
        """Called holding the condition: wait for joiners, close the group, then run it without the lock."""
        deadline = self._clock() + self.max_wait_s
        while not group.closed:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._cv.wait(remaining)
        group.closed = True
        if self._open.get(id(group.weights)) is group:
            del self._open[id(group.weights)]
        self.calls += 1
        self._cv.release()  # the model call runs unlocked: other groups may form meanwhile
        try:
            self._run(group)
        finally:
            self._cv.acquire()

    @staticmethod
    def _run(group: _Group) -> None:
        members = group.members
        try:
            with torch.no_grad():
                eps_hat = group.weights.eps_hat(torch.cat([m.x_t for m in members]), torch.cat([m.t for m in members]),
                                                torch.cat([m.labels for m in members])).float().cpu()
            offset = 0
            for m in members:
                m.result = eps_hat[offset:offset + m.x_t.shape[0]]
                offset += m.x_t.shape[0]
        except BaseException as exc:  # noqa: BLE001 -- every member learns of it; each re-raises it
            for m in members:
                m.error = exc
        finally:
            for m in members:
                m.done.set()

    @staticmethod
    def _answer(member: _Member) -> torch.Tensor:
        if member.error is not None:
            raise member.error
        assert member.result is not None
        return member.result
