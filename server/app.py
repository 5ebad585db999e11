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
from collafuse.common.data import DataError
from collafuse.common.files import write_json_atomic
from collafuse.common.rpc import RequestGuardInterceptor, server_options
from collafuse.common.runtime import resolve_device
from collafuse.common.tls import TlsError, server_credentials
from collafuse.server.auth import Authenticator, AuthInterceptor
from collafuse.server.errors import PortInUse, StartupError, StoreError
from collafuse.server.latent import served_setup
from collafuse.server.limits import check_request, max_request_bytes
from collafuse.server.observability import ServerMetrics
from collafuse.server.protocols import build_protocols, store_tables
from collafuse.server.sampler import Sampler, SamplingLimits
from collafuse.server.servicer import DEFAULT_CHUNK_BYTES, CollaFuseServicer
from collafuse.server.store import ReleaseStore
from collafuse.server.trainer import Trainer
from collafuse.server.transcript import TranscriptInterceptor
from collafuse.v1 import collafuse_pb2, collafuse_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = collafuse_pb2.DESCRIPTOR.services_by_name["CollaFuse"].full_name
SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
# How long past the grace period stop() waits for gRPC to finish cancelled calls.
STOP_MARGIN_S = 5.0


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
        metrics: ServerMetrics | None = None,
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
        self.metrics = metrics
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
            try:
                self.servicer.begin_shutdown()
                self._health.enter_graceful_shutdown()
                # gRPC cancels the calls still running after the grace period; if one is wedged anyway, stop
                # waiting for it: the checkpoint and the store lock matter more than a stuck call.
                bound = (grace or 0.0) + STOP_MARGIN_S
                if not self._grpc.stop(grace).wait(bound):
                    log.error("gRPC calls were still open %.0fs after shutdown began; stopping without them", bound)
                if not self.sampler.join(STOP_MARGIN_S):
                    log.error("a sampling worker was still in a model call %.0fs after shutdown", STOP_MARGIN_S)
                self.trainer.stop()
            finally:  # whatever failed above, free the store for the next server
                if self.metrics is not None:  # before the store it reads
                    self.metrics.close()
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
    sample_batch: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    poll_interval: float = 0.5,
    log_every: int = 50,
    data_parallel: int = 1,
) -> CollaFuseServer:
    """Start a server for ``settings``; raises StartupError (PortInUse, FingerprintMismatch, ...) on bad set-ups."""
    # Nothing in CollaFuse may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        settings = settings.for_dataset()
    except DataError as exc:
        raise StartupError(f"--dataset: {exc}") from exc
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from exc
    served = served_setup(settings)  # with --autoencoder: the latent's spec, and its identity in the fingerprint
    settings, fingerprint = served.settings, served.fingerprint
    image_shape = settings.image_shape
    schedule = settings.schedule()
    if settings.port and _port_taken(settings.host, settings.port):  # fail fast, before loading a checkpoint
        raise PortInUse(f"port {settings.port} is in use: pick another --port or stop the other process")
    try:  # credentials before the store: a wrong path fails fast
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
    except TlsError as exc:
        raise StartupError(str(exc)) from exc
    authenticator = Authenticator.from_settings(settings.tokens, settings.token, settings.tls_ca is not None,
                                                settings.operators)
    store_lock = _lock_store(Path(settings.store))
    try:
        store = ReleaseStore(settings.store, store_tables())
    except BaseException:
        store_lock.close()
        raise
    transcript: TranscriptInterceptor | None = None
    metrics: ServerMetrics | None = None
    try:
        store.bind_fingerprint(fingerprint)
        # The protocols this server speaks, built once: the servicer hands them requests, the trainer learns
        # from them, and those that step the model themselves (split rounds) are attached to its core.
        protocols = build_protocols(settings, store, data_parallel)
        try:
            trainer = Trainer(settings, store, fingerprint, protocols, device=device, poll_interval=poll_interval,
                              log_every=log_every)
        except ValueError as exc:  # e.g. an image size the model preset cannot take
            raise StartupError(str(exc)) from exc
        for protocol in protocols.values():
            protocol.attach(trainer.core, trainer.max_steps, trainer.after_external_step)
        limits = SamplingLimits.from_settings(settings, **({"max_batch": sample_batch} if sample_batch else {}))
        sampler = Sampler(schedule, image_shape, trainer.ema_snapshot, device, limits)
        transcript = TranscriptInterceptor(settings.transcript)
        servicer = CollaFuseServicer(
            settings, store, trainer, sampler, fingerprint, protocols, traffic=transcript.traffic,
            chunk_bytes=chunk_bytes, data_parallel=data_parallel, autoencoder=served.autoencoder,
        )
        # Outermost first: auth (a denied call is counted, never parsed or recorded), then the guard
        # (undecodable or over-limit messages -> INVALID_ARGUMENT), then the transcript of what was admitted.
        interceptors: list[grpc.ServerInterceptor] = [RequestGuardInterceptor(check_request), transcript]
        if authenticator is not None:
            interceptors.insert(0, AuthInterceptor(authenticator))
        if settings.metrics_port:
            metrics = ServerMetrics(trainer, store, sampler, transcript.traffic, list(protocols.values()),
                                    transcript=transcript, strikes=servicer.strikes)
            interceptors = metrics.instrument(interceptors)
        server = grpc.server(
            # Every admitted Sample call holds a thread while it waits: they get their own, on top of max_workers.
            ThreadPoolExecutor(max_workers=max_workers + limits.total),
            options=server_options(max_request_bytes(image_shape)),
            interceptors=interceptors,
        )
        collafuse_pb2_grpc.add_CollaFuseServicer_to_server(servicer, server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = _bind(server, settings.host, settings.port, credentials)
        if metrics is not None:
            metrics.serve(settings.host, settings.metrics_port)
        server.start()
    except BaseException:
        if metrics is not None:
            metrics.close()
        if transcript is not None:
            transcript.close()
        store.close()
        store_lock.close()
        raise
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    running = CollaFuseServer(
        settings, server, port, store, trainer, sampler, servicer, health_servicer, transcript, fingerprint, store_lock,
        metrics=metrics,
    )
    _write_server_file(running, device)
    if start_trainer:
        trainer.start()
    if authenticator is None:
        log.info("no --tokens, --token or --tls-ca set: any client that reaches this port may act as any client")
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


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"{_bracket(host)}:{port}"
    # Probe first so the usual mistake gets our message rather than a gRPC core log line.
    if port and _port_taken(host, port):
        raise PortInUse(f"port {port} is in use: pick another --port or stop the other process")
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
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
