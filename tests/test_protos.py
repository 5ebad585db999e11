"""The committed gRPC stubs are exactly what the .proto sources generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = sorted((ROOT / "protos/collafuse/v1").glob("*_pb2*.py*"))


def test_stubs_are_committed_and_current(tmp_path: Path) -> None:
    assert {p.name for p in GENERATED} >= {"collafuse_pb2.py", "collafuse_pb2_grpc.py", "collafuse_pb2.pyi", "tensor_pb2.py"}
    subprocess.run([sys.executable, str(ROOT / "protos/generate.py"), str(tmp_path)], check=True)
    for committed in GENERATED:
        fresh = tmp_path / "collafuse/v1" / committed.name
        assert fresh.is_file(), f"{committed.name} is no longer generated: delete it"
        assert fresh.read_text() == committed.read_text(), f"{committed.name} is stale: run `make protos` and commit"
    extra = {p.name for p in (tmp_path / "collafuse/v1").iterdir()} - {p.name for p in GENERATED}
    assert not extra, f"generated but not committed: {extra}"
