"""Build CollaFuse's Docker images where no container registry is reachable (as on the CI machine).

    python -m collafuse.deploy.docker.build                # tools, engine, base image, wheels, images
    python -m collafuse.deploy.docker.build --stop-engine  # stop the Docker engine this tool started

Each step is skipped when already done:

1. install what is missing (as root, with apt-get): Debian's ``docker.io`` (the engine), ``debootstrap``,
   and the Compose v2 plugin from Debian trixie's ``docker-compose`` package (a static binary that runs
   beside bookworm's engine; fetched with a private apt state, so the machine's apt sources stay as they are);
2. start ``dockerd`` when no engine answers, recording its pid so that ``--stop-engine`` stops only it;
3. build the base image in place of ``python:3.11-slim``: Debian bookworm's Python 3.11 in a venv
   (``debootstrap --variant=minbase``, then ``docker import``);
4. download every wheel the images need into ``deploy/docker/wheels/{torch,deps}``: pip inside a
   container reaches PyPI here, but through a TLS-intercepting proxy whose CA only the host trusts,
   so the images install offline (``PIP_NO_INDEX=1``) from the wheels the host's pip fetched;
5. build ``collafuse-server`` and ``collafuse-client`` (the Dockerfiles' defaults serve a machine with
   internet access; the build arguments below point them at the local base image and wheels).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

log = logging.getLogger("collafuse.docker")

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "deploy" / "docker" / "wheels"
STATE = ROOT / "build" / "docker"


class DockerSetupError(RuntimeError):
    """A step of the Docker set-up failed; the message says which and what to do."""


class BuildSettings(BaseModel):
    base_image: str = Field("collafuse/python:3.11-bookworm", description="local base image (built when missing)")
    suite: str = Field("bookworm", description="Debian release of the base image (its Python is 3.11)")
    mirror: str = Field("http://deb.debian.org/debian", description="Debian mirror for debootstrap")
    compose_suite: str = Field("trixie", description="Debian release whose docker-compose package gives `docker compose`")
    torch_version: str = Field("2.13.0", description="torch release installed in both images")
    torch_index_url: str | None = Field(
        None, description="index of the torch wheel (unset: pip's configured indexes; elsewhere "
                          "https://download.pytorch.org/whl/cpu)")
    server_image: str = Field("collafuse-server:latest", description="tag of the server image")
    client_image: str = Field("collafuse-client:latest", description="tag of the client image")
    storage_driver: str = Field("overlay2", description="dockerd storage driver when this tool starts the engine")


@dataclass
class BuildTimes:
    """Seconds each step took (0 where it was skipped)."""

    tools: float = 0.0
    engine: float = 0.0
    base_image: float = 0.0
    wheels: float = 0.0
    images: dict[str, float] = field(default_factory=dict)


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def _ok(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise DockerSetupError(f"{what} is missing and installing it needs root: run this as root, or install it yourself")


# ---- 1. tools -------------------------------------------------------------------------------------


def compose_available() -> bool:
    return _ok(["docker", "compose", "version"])


def install_compose_plugin(suite: str, mirror: str) -> None:
    """Install ``docker compose`` from Debian ``suite``'s docker-compose .deb, leaving apt's sources alone."""
    _require_root("the Docker Compose v2 plugin (`docker compose`)")
    with tempfile.TemporaryDirectory(prefix="collafuse-apt-") as tmp:
        state = Path(tmp)
        sources = state / f"{suite}.sources"
        sources.write_text(f"Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n"
                           "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        for sub in ("lists/partial", "cache/archives/partial"):
            (state / sub).mkdir(parents=True)
        # A private source list, package lists and cache: the system's apt configuration is untouched.
        options = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
                   f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}"]
        _run(["apt-get", *options, "-q", "update"], env=_apt_env())
        _run(["apt-get", *options, "-q", "download", "docker-compose"], cwd=state, env=_apt_env())
        debs = sorted(state.glob("docker-compose_*.deb"))
        if not debs:
            raise DockerSetupError(f"Debian {suite} offered no docker-compose package")
        _run(["dpkg", "-i", str(debs[-1])], env=_apt_env())
    if not compose_available():
        raise DockerSetupError("`docker compose version` fails after installing docker-compose; see dpkg's output above")


def ensure_tools(settings: BuildSettings, need_debootstrap: bool) -> None:
    """apt-get install what is missing: the engine (docker.io), debootstrap, the compose plugin."""
    packages = [pkg for pkg, exe in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
                if shutil.which(exe) is None and (pkg != "debootstrap" or need_debootstrap)]
    if packages:
        _require_root(" and ".join(packages))
        _run(["apt-get", "-q", "update"], env=_apt_env())
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=_apt_env())
    if not compose_available():
        install_compose_plugin(settings.compose_suite, settings.mirror)


# ---- 2. engine ------------------------------------------------------------------------------------

ENGINE_PID = STATE / "dockerd.pid"
# dockerd processes this process started: they must be waited for, or they linger as zombies after stopping.
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def engine_running() -> bool:
    return _ok(["docker", "info"])


def start_engine(storage_driver: str, timeout: float = 60.0) -> int:
    """Start dockerd in its own session (it outlives this process); its pid goes to ENGINE_PID."""
    if shutil.which("dockerd") is None:
        raise DockerSetupError("dockerd is not installed: apt-get install docker.io (or run this tool as root)")
    _require_root("a running Docker engine")
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "dockerd.log", "ab") as out:
        proc = subprocess.Popen(["dockerd", "--storage-driver", storage_driver], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    ENGINE_PID.write_text(str(proc.pid))
    _STARTED[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while not engine_running():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DockerSetupError(f"dockerd did not come up (exit code {proc.poll()}); see {STATE / 'dockerd.log'}")
        time.sleep(0.5)
    log.info("started dockerd (pid %d, log %s)", proc.pid, STATE / "dockerd.log")
    return proc.pid


def _is_dockerd(pid: int) -> bool:
    """A live (not zombie) dockerd has this pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()[0]
    return name == "dockerd" and state != "Z"


def stop_engine(timeout: float = 60.0) -> bool:
    """Stop the dockerd that start_engine started (and nothing else); True when one was stopped."""
    if not ENGINE_PID.is_file():
        return False
    pid = int(ENGINE_PID.read_text())
    ENGINE_PID.unlink()
    if not _is_dockerd(pid):  # gone already, or the pid was reused by another program
        return False
    os.kill(pid, signal.SIGTERM)  # dockerd stops its containers and its containerd on SIGTERM
    deadline = time.monotonic() + timeout
    child = _STARTED.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise DockerSetupError(f"dockerd (pid {pid}) did not stop within {timeout:.0f}s") from exc
    while _is_dockerd(pid):  # started by an earlier run of this tool: not our child, so poll
        if time.monotonic() > deadline:
            raise DockerSetupError(f"dockerd (pid {pid}) did not stop within {timeout:.0f}s")
        time.sleep(0.5)
    log.info("stopped dockerd (pid %d)", pid)
    return True


# ---- 3. base image --------------------------------------------------------------------------------


def image_exists(name: str) -> bool:
    return _ok(["docker", "image", "inspect", name])


def build_base_image(settings: BuildSettings) -> None:
    """Debian ``suite`` (minbase) with python3 in a venv on PATH, like python:3.11-slim: python and pip."""
    STATE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=STATE) as tmp:
        rootfs = Path(tmp)
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
              settings.suite, str(rootfs), settings.mirror], stdout=subprocess.DEVNULL)
        # What a slim image leaves out: the package cache and lists.
        for junk in ("var/cache/apt", "var/lib/apt/lists"):
            for path in (rootfs / junk).rglob("*"):
                if path.is_file():
                    path.unlink()
        # Debian's python3 refuses `pip install` outside a venv (PEP 668); the Dockerfiles expect plain pip.
        _run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/opt/venv"])
        search_path = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _run(["docker", "import", "--change", f"ENV PATH={search_path}", "--change", "ENV LANG=C.UTF-8",
              "--change", 'CMD ["python3"]', "-", settings.base_image], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise DockerSetupError(f"tar of {rootfs} failed")


# ---- 4. wheels ------------------------------------------------------------------------------------


def image_requirements(torch_version: str) -> list[str]:
    """torch, the project's dependencies and its build requirements: all an image installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [f"torch=={torch_version}", *project["project"]["dependencies"], *project["build-system"]["requires"]]


def download_wheels(settings: BuildSettings) -> bool:
    """Wheels for every requirement (and theirs) into WHEELS; False when the same set is there already.

    torch and its dependencies go to WHEELS/torch, the rest to WHEELS/deps: two image layers, so that a new
    dependency of the project does not reinstall torch.
    """
    requirements = image_requirements(settings.torch_version)
    torch_dir, deps_dir = WHEELS / "torch", WHEELS / "deps"
    stamp = STATE / "wheels.json"
    key = json.dumps({"python": sys.version_info[:2], "requirements": requirements})
    if stamp.is_file() and stamp.read_text() == key and any(torch_dir.glob("torch-*.whl")):
        return False
    pip = [sys.executable, "-m", "pip", "--quiet"]
    # torch from its own index where one is given (elsewhere PyPI's Linux torch is the CUDA build).
    index = ["--index-url", settings.torch_index_url] if settings.torch_index_url else []
    _run([*pip, "download", "--dest", str(torch_dir), *index, requirements[0]])
    # sdists become wheels here, so that the image needs no build tools; the host's Python must be the image's.
    _run([*pip, "wheel", "--wheel-dir", str(deps_dir), "--find-links", str(torch_dir), "--find-links", str(deps_dir),
          *requirements])
    for wheel in torch_dir.glob("*.whl"):
        (deps_dir / wheel.name).unlink(missing_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    return True


def check_python_matches(base_image: str) -> None:
    """Wheels built here carry this Python's ABI tag; the image's Python must be the same minor version."""
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", base_image, "python", "-c",
                          "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if out != here:
        raise DockerSetupError(f"{base_image} has Python {out} but the wheels are for {here}: "
                               f"run this tool with a Python {out} interpreter")


# ---- 5. images ------------------------------------------------------------------------------------


def build_image(settings: BuildSettings, role: str) -> float:
    """``docker build`` of deploy/Dockerfile.<role> from the local base image and wheels; seconds taken.

    The full output goes to build/docker/<role>-build.log; each Dockerfile step is logged with its start time.
    """
    tag = settings.server_image if role == "server" else settings.client_image
    # Both images get the same torch here, with the same build arguments, so they share the build stage.
    cmd = ["docker", "build", "--file", str(ROOT / "deploy" / f"Dockerfile.{role}"), "--tag", tag,
           "--build-arg", f"BASE_IMAGE={settings.base_image}",
           "--build-arg", f"TORCH_VERSION={settings.torch_version}",
           "--build-arg", f"TORCH_INDEX_URL={settings.torch_index_url or 'https://download.pytorch.org/whl/cpu'}",
           "--build-arg", "PIP_NO_INDEX=1", str(ROOT)]
    log.info("$ %s", " ".join(cmd))
    STATE.mkdir(parents=True, exist_ok=True)
    build_log = STATE / f"{role}-build.log"
    started = time.monotonic()
    with open(build_log, "w", buffering=1) as out:  # line-buffered: readable while the build runs
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if line.startswith("Step "):
                log.info("%s +%.0fs %s", role, time.monotonic() - started, line.strip()[:120])
    if proc.wait() != 0:
        tail = "".join(build_log.read_text().splitlines(keepends=True)[-30:])
        raise DockerSetupError(f"docker build of {tag} failed (full log: {build_log}):\n{tail}")
    seconds = time.monotonic() - started
    log.info("built %s in %.0fs", tag, seconds)
    return seconds


def build_all(settings: BuildSettings) -> tuple[BuildTimes, bool]:
    """Steps 1-5; returns the times and whether this call started the engine (the caller may stop it)."""
    times = BuildTimes()
    started = time.monotonic()
    ensure_tools(settings, need_debootstrap=True)
    times.tools = time.monotonic() - started
    started_engine = False
    if not engine_running():
        started = time.monotonic()
        start_engine(settings.storage_driver)
        started_engine = True
        times.engine = time.monotonic() - started
    if not image_exists(settings.base_image):
        started = time.monotonic()
        build_base_image(settings)
        times.base_image = time.monotonic() - started
    check_python_matches(settings.base_image)
    for role in ("server", "client"):
        # Checked before each image: pyproject.toml may have gained a dependency meanwhile.
        started = time.monotonic()
        if download_wheels(settings):
            times.wheels += time.monotonic() - started
        times.images[role] = build_image(settings, role)
    log.info("build times (s): %s", json.dumps(asdict(times)))
    return times, started_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collafuse.deploy.docker.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-engine", action="store_true", help="stop the dockerd this tool started, and exit")
    for name, info in BuildSettings.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=info.default,
                            help=f"{info.description} [default: {info.default}]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [docker] %(message)s", datefmt="%H:%M:%S")
    try:
        if args.stop_engine:
            if not stop_engine():
                log.info("no dockerd started by this tool is running")
            return 0
        settings = BuildSettings(**{name: getattr(args, name) for name in BuildSettings.model_fields})
        build_all(settings)
    except (DockerSetupError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
