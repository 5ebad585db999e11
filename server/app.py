"""Assemble and start the server: store, trainer, sampler, servicer, health, reflection, one port."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from collafuse.common.config import ServerSettings
from collafuse.common.files import write_json_atomic
from collafuse.common.rpc import TokenAuthInterceptor, server_options
from collafuse.common.runtime import resolve_device
from collafuse.common.schedule import fingerprint as schedule_fingerprint
from collafuse.server.errors import PortInUse, StartupError, StoreError
from collafuse.server.sampler import Sampler
from collafuse.server.servicer import DEFAULT_CHUNK_BYTES, CollaFuseServicer
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.server.transcript import TranscriptInterceptor
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = collafuse_pb2.DESCRIPTOR.services_by_name["CollaFuse"].full_name
SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"


class CollaFuseServer:
    """A running server; ``stop`` shuts it down gracefully and writes a last checkpoint."""

    def __init__(
        self,
        settings: ServerSettings,
        grpc_server: grpc.Server,
        port: int,
        store: ReleaseStore,
        trainer: Trainer,
        sampler: Sampler,
        servicer: CollaFuseServicer,
        health_servicer: health.HealthServicer,
        transcript: TranscriptInterceptor,
        fingerprint: str,
        store_lock: IO[str],
    ) -> None:
        self.settings = settings
        self.port = port
        self.host = settings.host
        self.store = store
        self.trainer = trainer
        self.sampler = sampler
        self.servicer = servicer
        self.transcript = transcript
        self.fingerprint = fingerprint
        self.device = trainer.device
        self._grpc = grpc_server
        self._health = health_servicer
        self._store_lock = store_lock
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def address(self) -> str:
        """Where a client on this machine can reach the server."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"{_bracket(host)}:{self.port}"

    @property
    def server_file(self) -> Path:
        return self.store.root / SERVER_FILE

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (True) or the timeout passes (False)."""
        return self._stopped.wait(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls (UNAVAILABLE, health NOT_SERVING), finish in-flight ones, checkpoint, close."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            log.info("shutting down (grace %.1fs)", grace or 0.0)
            self.servicer.begin_shutdown()
            self._health.enter_graceful_shutdown()
            self._grpc.stop(grace).wait()
            self.trainer.stop()
            self.transcript.close()
            self.store.close()
            self.server_file.unlink(missing_ok=True)
            self._store_lock.close()  # releases the flock
            self._stopped.set()
            log.info("server stopped")


def build_server(
    settings: ServerSettings,
    *,
    start_trainer: bool = True,
    max_workers: int = 16,
    sample_batch: int = 256,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    poll_interval: float = 0.5,
    log_every: int = 50,
) -> CollaFuseServer:
    """Start a server for ``settings``; raises StartupError (PortInUse, FingerprintMismatch, ...) on bad set-ups."""
    # Nothing in CollaFuse may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from exc
    image_shape = (settings.channels, settings.image_size, settings.image_size)
    schedule = settings.schedule()
    fingerprint = schedule_fingerprint(schedule, image_shape, list(settings.classes))
    if settings.port and _port_taken(settings.host, settings.port):  # fail fast, before loading a checkpoint
        raise PortInUse(f"port {settings.port} is in use: pick another --port or stop the other process")
    store_lock = _lock_store(Path(settings.store))
    try:
        store = ReleaseStore(settings.store)
    except BaseException:
        store_lock.close()
        raise
    transcript: TranscriptInterceptor | None = None
    try:
        store.bind_fingerprint(fingerprint)
        try:
            trainer = Trainer(settings, store, fingerprint, device=device, poll_interval=poll_interval, log_every=log_every)
        except ValueError as exc:  # e.g. an image size the model preset cannot take
            raise StartupError(str(exc)) from exc
        sampler = Sampler(schedule, image_shape, trainer.ema_snapshot, device, batch_size=sample_batch)
        transcript = TranscriptInterceptor(settings.transcript)
        servicer = CollaFuseServicer(
            settings, store, trainer, sampler, fingerprint, traffic=transcript.traffic, chunk_bytes=chunk_bytes
        )
        interceptors: list[grpc.ServerInterceptor] = [transcript]
        if settings.token:
            interceptors.append(TokenAuthInterceptor(settings.token))
        server = grpc.server(ThreadPoolExecutor(max_workers=max_workers), options=server_options(), interceptors=interceptors)
        collafuse_pb2_grpc.add_CollaFuseServicer_to_server(servicer, server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = _bind(server, settings.host, settings.port)
        server.start()
    except BaseException:
        if transcript is not None:
            transcript.close()
        store.close()
        store_lock.close()
        raise
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    running = CollaFuseServer(
        settings, server, port, store, trainer, sampler, servicer, health_servicer, transcript, fingerprint, store_lock
    )
    _write_server_file(running, device)
    if start_trainer:
        trainer.start()
    if settings.token is None:
        log.info("no --token set: any client that reaches this port may call the server")
    return running


def _lock_store(root: Path) -> IO[str]:
    """One server per store: two trainers would overwrite each other's checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK_FILE, "a+")  # noqa: SIM115 -- held (and the lock with it) until stop()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(
            f"the store {root} is in use by another running collafuse-server (see {root / SERVER_FILE}): "
            "stop that server or pick another --store"
        ) from None
    return handle


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _bind(server: grpc.Server, host: str, port: int) -> int:
    address = f"{_bracket(host)}:{port}"
    # Probe first so the usual mistake gets our message rather than a gRPC core log line.
    if port and _port_taken(host, port):
        raise PortInUse(f"port {port} is in use: pick another --port or stop the other process")
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound:
        return bound
    if port and _port_taken(host, port):
        raise PortInUse(f"port {port} is in use: pick another --port or stop the other process")
    raise StartupError(f"cannot listen on {address}: check --host (an address of this machine) and --port")


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like gRPC, allow TIME_WAIT leftovers of a restarted server; an active listener still conflicts.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _write_server_file(server: CollaFuseServer, device: torch.device) -> None:
    """``<store>/server.json``: how to reach this process (the port matters with --port 0)."""
    payload = {
        "host": server.host,
        "port": server.port,
        "address": server.address,
        "pid": os.getpid(),
        "server_id": server.store.server_id,
        "fingerprint": server.fingerprint,
        "device": str(device),
        "started_at": time.time(),
    }
    write_json_atomic(server.server_file, payload, sort_keys=False)
