"""Shared test set-up: one torch thread (the CI machine has 2 cores), no hub access."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COLLAFUSE_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "features"))

import torch  # noqa: E402

torch.set_num_threads(1)
