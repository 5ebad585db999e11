"""Shared test set-up: one torch thread (the CI machine has 2 cores), no hub access."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLLAFUSE_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "features"))

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """A CLI's main() reconfigures the root logger onto the captured streams; put pytest's back afterwards
    (autouse: otherwise a later test logs into a stream pytest has closed)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
