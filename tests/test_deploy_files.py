"""docker-compose.yml and the Dockerfiles checked against the project without an engine.

tests/test_docker_compose.py builds and runs them for real (slow, needs Docker: `make test-docker`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from collafuse.deploy.docker.compose import compose_for

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
ROLES = ("server", "client")


def dockerfile(name: str) -> list[tuple[str, str]]:
    text = (ROOT / "deploy" / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def build_args(name: str) -> dict[str, str]:
    """The ARG defaults declared before the first FROM (the ones a user's plain `docker build` gets)."""
    args: dict[str, str] = {}
    for op, arg in dockerfile(name):
        if op == "FROM":
            break
        if op == "ARG" and "=" in arg:
            key, value = arg.split("=", 1)
            args[key] = value
    return args


def load_compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


@pytest.mark.parametrize("role", ROLES)
def test_dockerfile_builds_from_the_tree(role: str) -> None:
    name = f"Dockerfile.{role}"
    instructions = dockerfile(name)
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert stages == ["${BASE_IMAGE} AS build", "build AS project", "${BASE_IMAGE}"], (
        f"{name}: dependencies, the project's wheel, then the runtime stage")
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the tree"
    runs = [arg for op, arg in instructions if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip wheel .*/src$", r))
    assert torch_at < project_at, "torch must be installed before the project (pinned build)"
    assert re.search(r"pip install .*/dist/\*\.whl", runs[-1]), "the runtime stage installs the project's wheel"
    entry = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[0])[0] in SCRIPTS


def test_build_context_holds_every_package() -> None:
    """`COPY . /src` installs the project: .dockerignore must leave every package folder in the context."""
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    folders = {"protos", "deploy", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    for folder in sorted(folders):
        top = folder.split("/")[0]
        assert not [p for p in ignored if fnmatch.fnmatch(top, p)], f".dockerignore drops {top}/, which the image installs"
    assert ".venv" in ignored and ".git" in ignored, "the build context must not carry the venv or the git history"


def test_dockerfile_defaults_serve_a_machine_with_internet() -> None:
    server, client = build_args("Dockerfile.server"), build_args("Dockerfile.client")
    for args in (server, client):
        assert args["BASE_IMAGE"] == "python:3.11-slim"
        assert args["PIP_NO_INDEX"] == "0", "online by default; offline only where the build tool says so"
    assert client["TORCH_INDEX_URL"].endswith("/whl/cpu"), "clients get the small CPU build of torch"
    assert "cpu" not in server["TORCH_INDEX_URL"], "the GPU server gets a CUDA build of torch"
    assert server["TORCH_VERSION"] == client["TORCH_VERSION"]


def test_the_images_share_their_build_stage() -> None:
    """Same build stages in both files, so one image's layers are the other's build cache."""

    def build_stage(name: str) -> list[tuple[str, str]]:
        instructions = dockerfile(name)
        froms = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
        return instructions[froms[0]:froms[-1] + 5]  # up to the runtime stage's install of the project

    assert build_stage("Dockerfile.server") == build_stage("Dockerfile.client")


def test_compose_topology() -> None:
    compose = load_compose()
    services = compose["services"]
    server = services["server"]
    assert server["build"]["dockerfile"] == "deploy/Dockerfile.server"
    assert (ROOT / server["build"]["dockerfile"]).is_file()
    assert "collafuse.deploy.healthcheck" in " ".join(server["healthcheck"]["test"])
    clients = {name: svc for name, svc in services.items() if name.startswith("client-")}
    assert len(clients) >= 2
    assert server["environment"]["COLLAFUSE_MIN_CLIENTS"] == str(len(clients))
    for name, svc in clients.items():
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        assert svc["environment"]["COLLAFUSE_SERVER"] == "server:50051"
        data = [v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == "/data/local"]
        assert data and data[0]["read_only"], f"{name} must mount its shard read-only"
        assert data[0]["source"] == f"{name}-data", f"{name} must see only its own shard"
        assert f"{name}-data:/shards/{name}" in services["prepare"]["volumes"], f"prepare must fill {name}'s shard"
        assert svc["command"][0] == "run" and "--data" in svc["command"]
        assert svc["environment"]["COLLAFUSE_CLIENT_ID"] == name
    declared = set(compose["volumes"])
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert source in declared


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume of a service's short-syntax mounts."""
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", []) if isinstance(v, str)}


def test_compose_mutual_tls() -> None:
    """Every process talks mutual TLS; the CA key stays in the certs service; a client holds only its own key."""
    services = load_compose()["services"]
    server, certs = services["server"], services["certs"]
    assert certs["image"] == services["prepare"]["image"], "the one-shot certs service runs a project image"
    assert server["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    env = server["environment"]
    assert (env["COLLAFUSE_TLS_CERT"], env["COLLAFUSE_TLS_KEY"], env["COLLAFUSE_TLS_CA"]) == (
        "/certs/server.pem", "/certs/server.key", "/certs/ca.pem")
    assert _mounts(server)["/certs"] == "server-certs"
    probe = server["healthcheck"]["test"]
    assert probe[probe.index("--tls-cert") + 1] == "/certs/probe.pem", "the healthcheck needs a client certificate"
    assert "--operators" not in server["command"], "the health service is open to any valid certificate"
    for name, svc in services.items():
        # Keys are 0600: a container running as another user could not read its own key.
        assert "user" not in svc, f"{name} sets `user:`; every container must run as the images' user"
        if name != "certs":
            assert "certs" not in _mounts(svc).values(), f"{name} mounts the CA's volume (its private key)"
    clients = {name: svc for name, svc in services.items() if name.startswith("client-")}
    for name, svc in clients.items():
        env = svc["environment"]
        assert (env["COLLAFUSE_TLS_CERT"], env["COLLAFUSE_TLS_KEY"]) == (f"/certs/{name}.pem", f"/certs/{name}.key")
        assert env["COLLAFUSE_TLS_CA"] == "/certs/ca.pem"
        assert f"{name}-certs:/certs:ro" in svc["volumes"], f"{name} must see only its own certificate"
        assert f"{name}-certs:/out/{name}" in certs["volumes"], f"certs must fill {name}'s certificate volume"
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    command = " ".join(certs["command"])
    assert f'clients="{" ".join(clients)}"' in command, "one certificate per client service"
    for tool in re.findall(r"(collafuse-[a-z]+)", command):
        assert tool in SCRIPTS


def _run_certs_script(root: Path, clients: list[str]) -> None:
    """The certs service's script on this machine: its volumes are folders under ``root``."""
    script = " ".join(load_compose()["services"]["certs"]["command"]).replace("$$", "$")
    script = re.sub(r'clients="[^"]*"', f'clients="{" ".join(clients)}"', script)
    script = script.replace("/pki", str(root / "pki")).replace("/out/", f"{root}/out/")
    for name in ("server", *clients):
        (root / "out" / name).mkdir(parents=True, exist_ok=True)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # collafuse-tls of this venv
    done = subprocess.run(["sh", "-c", script], env={**os.environ, "PATH": path}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_compose_certs_script_issues_what_each_service_needs(tmp_path: Path) -> None:
    clients = ["client-0", "client-1"]
    _run_certs_script(tmp_path, clients)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "server").iterdir()) == [
        "ca.pem", "probe.key", "probe.pem", "server.key", "server.pem"]
    ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server" / "server.pem").read_bytes())
    hosts = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert hosts == ["server", "localhost"], "clients dial server:50051, the healthcheck localhost:50051"
    for name in clients:
        assert sorted(p.name for p in (out / name).iterdir()) == ["ca.pem", f"{name}.key", f"{name}.pem"]
        cert = x509.load_pem_x509_certificate((out / name / f"{name}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert stat.S_IMODE((out / name / f"{name}.key").stat().st_mode) == 0o600
    # A second `up` keeps the CA, so a server still running with it accepts the clients of the second run.
    _run_certs_script(tmp_path, [*clients, "client-2"])
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == (out / "client-2" / "ca.pem").read_bytes()
    assert x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.pem").read_bytes()) == ca


def test_compose_prepare_uses_real_commands() -> None:
    compose = load_compose()
    command = " ".join(compose["services"]["prepare"]["command"])
    for tool in re.findall(r"(collafuse-[a-z]+)", command):
        assert tool in SCRIPTS
    clients = [name for name in compose["services"] if name.startswith("client-")]
    assert f"--clients {len(clients)}" in command, "one shard per client service"


def test_compose_file_is_the_generated_one_for_three_clients() -> None:
    """docker-compose.yml's clients follow client-0 exactly, so `compose_for` scales the same file."""
    compose = load_compose()
    assert compose_for(3, compose) == compose


def test_compose_for_more_clients() -> None:
    compose = compose_for(5, load_compose())
    services = compose["services"]
    names = [f"client-{k}" for k in range(5)]
    assert [n for n in services if n.startswith("client-")] == names
    shards = [v["source"] for n in names for v in services[n]["volumes"] if isinstance(v, dict)]
    assert shards == [f"{n}-data" for n in names], "each client sees only its own shard"
    assert services["prepare"]["volumes"] == [f"{n}-data:/shards/{n}" for n in names]
    assert [services[n]["environment"]["COLLAFUSE_CLIENT_ID"] for n in names] == names
    assert [services[n]["environment"]["COLLAFUSE_TLS_CERT"] for n in names] == [f"/certs/{n}.pem" for n in names]
    assert all(f"{n}:/work" in services[n]["volumes"] for n in names) and set(names) <= set(compose["volumes"])
    assert all(f"{n}-certs:/certs:ro" in services[n]["volumes"] for n in names)
    assert services["certs"]["volumes"] == ["certs:/pki", "server-certs:/out/server",
                                            *(f"{n}-certs:/out/{n}" for n in names)]
    assert f'clients="{" ".join(names)}"' in " ".join(services["certs"]["command"])
    assert "--clients 5" in " ".join(services["prepare"]["command"])
    assert services["server"]["environment"]["COLLAFUSE_MIN_CLIENTS"] == "5"
    with pytest.raises(ValueError, match="at least 1"):
        compose_for(0, load_compose())


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` tag (drop the base file's value)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def test_smoke_override_only_shrinks_budgets() -> None:
    """deploy/docker/compose.smoke.yml (CI's run) names only services of docker-compose.yml and sets tiny budgets."""
    smoke = yaml.load((ROOT / "deploy" / "docker" / "compose.smoke.yml").read_text(), Loader=_ComposeLoader)
    services = load_compose()["services"]
    assert set(smoke["services"]) <= set(services)
    assert int(smoke["services"]["server"]["environment"]["COLLAFUSE_MAX_STEPS"]) <= 50
    for name, svc in smoke["services"].items():
        if name.startswith("client-"):
            assert int(svc["environment"]["COLLAFUSE_TRAIN_STEPS"]) <= 50
