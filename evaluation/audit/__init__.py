"""The privacy audit (docs/design.md §7, §10): payload checks, reconstruction attacks, information disclosure,
``collafuse-audit``.

The core is a library of pure functions of tensors and a denoiser (``payloads``, ``attacks``, ``quality``,
``core``); ``transcript`` reads the server's recorded requests and ``cli`` is the thin command.
"""

from collafuse.evaluation.audit.attacks import Reconstruction, score
from collafuse.evaluation.audit.core import AuditConfig, audit_group
from collafuse.evaluation.audit.payloads import check_noise, check_raw, estimate_blind, estimate_known
from collafuse.evaluation.audit.quality import psnr, ssim

__all__ = [
    "AuditConfig",
    "Reconstruction",
    "audit_group",
    "check_noise",
    "check_raw",
    "estimate_blind",
    "estimate_known",
    "psnr",
    "score",
    "ssim",
]
