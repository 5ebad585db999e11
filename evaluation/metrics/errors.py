"""Errors of the evaluation code: each message says what is wrong and what to pass instead."""

from __future__ import annotations


class MetricsError(ValueError):
    """An evaluation cannot run as asked (too few images, missing weights, mismatched features)."""
