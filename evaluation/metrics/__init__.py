"""Evaluation (docs/design.md §10): FID/KID with the standard Inception weights offline, Fréchet distances on any
features (FCD with local CLIP weights), conditional accuracy, and the ``collafuse-eval`` CLI.

Heavy pieces (the Inception network, CLIP, scikit-learn) load only when their module is imported.
"""

from collafuse.evaluation.metrics.distances import KidResult, frechet_distance, kernel_inception_distance
from collafuse.evaluation.metrics.errors import MetricsError

__all__ = [
    "KidResult",
    "MetricsError",
    "frechet_distance",
    "kernel_inception_distance",
]
