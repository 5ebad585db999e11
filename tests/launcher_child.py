"""A CLI-shaped module (``main(argv) -> int``) that ``test_launcher`` starts in child processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command, out = args[0], Path(args[1])
    if command == "compute":
        torch.set_num_threads(int(args[2]))
        a = torch.randn(512, 512)
        for _ in range(5):
            a = (a @ a).tanh()
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
        logging.getLogger("child").info("computed on %d threads", torch.get_num_threads())
        print("stdout line", flush=True)
        info = {"threads": torch.get_num_threads(), "finite": bool(torch.isfinite(a).all()), "pid": os.getpid(),
                "env": os.environ.get("LAUNCHER_TEST"), "argv0": sys.argv[0]}
        out.write_text(json.dumps(info))
        return 0
    if command == "exit":
        print("failing on purpose", file=sys.stderr)
        return int(args[2])
    if command == "wait":  # until SIGTERM, which it answers like the CLIs: clean up, exit 0
        signal.signal(signal.SIGTERM, lambda *_: (out.write_text("terminated"), sys.exit(0)))
        out.write_text("waiting")
        time.sleep(120)
        return 1
    raise ValueError(command)


if __name__ == "__main__":
    raise SystemExit(main())
