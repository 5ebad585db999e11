"""Evaluation (DESIGN 6): FID/KID with the standard Inception weights offline, Fréchet distances on any
features (FCD with local CLIP weights), conditional accuracy, and the ``collafuse-eval`` CLI.

Heavy pieces (the Inception network, CLIP, scikit-learn) load only when their module is imported.
"""

from collafuse.common.metrics.errors import MetricsError
from collafuse.common.metrics.frechet import GaussianStats, frechet_distance, gaussian_stats
from collafuse.common.metrics.kid import KidResult, kernel_inception_distance

__all__ = [
    "GaussianStats",
    "KidResult",
    "MetricsError",
    "frechet_distance",
    "gaussian_stats",
    "kernel_inception_distance",
]
