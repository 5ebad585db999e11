"""docker-compose.yml and the Dockerfiles are real: parsed and checked against the project.

There is no Docker engine on the CI machine; `collafuse-sim` runs the same topology.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def dockerfile(name: str) -> list[tuple[str, str]]:
    text = (ROOT / "deploy" / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.client"])
def test_dockerfile_builds_from_the_tree(name: str) -> None:
    instructions = dockerfile(name)
    assert instructions[0][0] == "FROM"
    for op, arg in instructions:
        if op == "COPY":
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the tree"
    runs = [arg for op, arg in instructions if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_at < project_at, "torch must be installed before the project (pinned build)"
    entry = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[0])[0] in SCRIPTS
    for package_dir in ("common", "server", "client", "protos", "deploy"):
        assert any(op == "COPY" and package_dir in arg for op, arg in instructions), f"{name} misses {package_dir}/"


def test_compose_topology() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    server = services["server"]
    assert server["build"]["dockerfile"] == "deploy/Dockerfile.server"
    assert (ROOT / server["build"]["dockerfile"]).is_file()
    assert "collafuse.deploy.healthcheck" in " ".join(server["healthcheck"]["test"])
    clients = {name: svc for name, svc in services.items() if name.startswith("client-")}
    assert len(clients) >= 2
    for name, svc in clients.items():
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        assert svc["environment"]["COLLAFUSE_SERVER"] == "server:50051"
        data = [v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == "/data/local"]
        assert data and data[0]["read_only"], f"{name} must mount its shard read-only"
        assert data[0]["volume"]["subpath"] == name, f"{name} must see only its own shard"
        assert svc["command"][0] == "run" and "--data" in svc["command"]
    declared = set(compose["volumes"])
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert source in declared


def test_compose_prepare_uses_real_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = " ".join(compose["services"]["prepare"]["command"])
    for tool in re.findall(r"(collafuse-[a-z]+)", command):
        assert tool in SCRIPTS
