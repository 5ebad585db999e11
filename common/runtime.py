"""Process set-up shared by every CLI: logging, torch threads, device choice, CLI error exits."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: CLIs without a model (collafuse-tls) start in well under a second
    import torch

log = logging.getLogger("collafuse")


def setup_logging(level: str = "INFO", name: str = "collafuse") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [{name}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Nothing in CollaFuse may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup_torch(threads: int = 0) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when available; ``cuda`` without a GPU is a clear error."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU; use --device auto or cpu")
    return torch.device(choice)


def run_cli(main: Callable[[], int], expected: tuple[type[BaseException], ...]) -> int:
    """Run a CLI body; expected errors print one plain line and exit 2, Ctrl-C exits 130."""
    try:
        return main()
    except expected as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
