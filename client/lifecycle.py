"""The client's lifecycle: join, release, train locally, wait for the server, generate.

``ClientLifecycle`` holds what the steps share (settings, ledger, connection, the
server's reply, the metrics file) and exposes each step as a method, so the CLI's
sub-commands and an in-process simulation drive the same code:

    with ClientLifecycle(settings) as client:
        metrics = client.run()          # or client.register(), client.release(), ...

Order matters for privacy and for errors: the data folder is checked before the
server is contacted; the server's spec is checked before any image is loaded; the
ledger is consulted before any byte leaves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
import torch
from google.protobuf.json_format import MessageToDict
from tqdm.auto import tqdm

from collafuse.client.connection import ServerConnection, ServerInfo
from collafuse.client.errors import ClientError, FingerprintMismatch
from collafuse.client.generate import GenerateResult, generate_samples
from collafuse.client.ledger import Ledger
from collafuse.client.release import ReleaseReport, release_images
from collafuse.client.report import RunReport, read_json
from collafuse.client.trainer import TrainResult, progress_disabled, train_local
from collafuse.common.config import ClientSettings
from collafuse.common.data import UNLABELED, DataError, ImageDataset, load_image_folder, scan_image_folder
from collafuse.common.files import write_json_atomic
from collafuse.common.rpc import RetryPolicy
from collafuse.common.runtime import resolve_device
from collafuse.common.sampling import count_model_evaluations
from collafuse.common.schedule import validate_cut
from collafuse.common.settings import ConfigError
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)

SERVER_FILE = "server.json"
POLL_SECONDS = 2.0
# Log the wait at most this often when no progress bar is shown.
WAIT_LOG_SECONDS = 15.0


@dataclass
class LocalData:
    """The client's images converted to the server's spec, with labels in the server's class order."""

    root: Path
    dataset: ImageDataset
    labels: torch.Tensor


def map_labels(class_names: list[str], served: list[str], root: Path) -> torch.Tensor:
    """Label indices in the server's list; unlabeled images get the null label len(served)."""
    unknown = sorted({c for c in class_names if c != UNLABELED and c not in served})
    if unknown:
        raise DataError(
            f"classes {unknown} in {root} are not served by the server (it serves {served}); rename or remove "
            "those folders, or start the server with --classes that include them"
        )
    index = {name: i for i, name in enumerate(served)}
    return torch.tensor([index.get(c, len(served)) for c in class_names], dtype=torch.long)


class ClientLifecycle:
    """One client workdir talking to one server; each public method is one step of the lifecycle."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        connection: ServerConnection | None = None,
        poll_interval: float = POLL_SECONDS,
        show_progress: bool | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.workdir = Path(settings.workdir)
        try:
            self.device = resolve_device(settings.device)
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from exc
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.workdir)
        try:
            self.client_id = self.ledger.client_id(settings.client_id)
        except BaseException:
            self.ledger.close()
            raise
        self.report = RunReport(self.workdir)
        self.report.update(client_id=self.client_id, server=settings.server, cut=settings.cut, protocol=settings.protocol)
        self._connection = connection
        self._owns_connection = connection is None
        self._info: ServerInfo | None = None
        self._data: LocalData | None = None
        self.poll_interval = poll_interval
        self.show_progress = show_progress
        self._sleep = sleep

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def connection(self) -> ServerConnection:
        if self._connection is None:
            s = self.settings
            self._connection = ServerConnection(s.server, s.token, RetryPolicy(attempts=s.retries), s.rpc_timeout)
        return self._connection

    def close(self) -> None:
        try:
            if self._connection is not None:
                self.report.record_traffic(self._connection.traffic_report())
                self.report.update(ledger=self.ledger.summary())
                self.report.save()
        finally:
            if self._connection is not None and self._owns_connection:
                self._connection.close()
            self.ledger.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save_report(self) -> None:
        if self._connection is not None:
            self.report.record_traffic(self._connection.traffic_report())
        self.report.save()

    # -- steps ------------------------------------------------------------------------------------

    def scan(self) -> list[tuple[Path, str]]:
        """Check --data without reading pixels (missing, not a folder, empty)."""
        if self.settings.data is None:
            raise DataError("no --data given: pass --data with a folder of images (one sub-folder per class)")
        return scan_image_folder(self.settings.data)

    def class_names(self) -> list[str]:
        return sorted({c for _, c in self.scan() if c != UNLABELED})

    def register(self) -> ServerInfo:
        """Join the server; check its fingerprint, cut range and image size against ours."""
        s = self.settings
        classes = self.class_names()
        expected = self.ledger.fingerprint
        with self.report.phase("register"):
            try:
                info = self.connection.register(self.client_id, s.cut, s.protocol, classes, expected)
            except ClientError as exc:
                # The server answers FAILED_PRECONDITION for other order problems too (e.g. a new cut
                # while releases are held); only a fingerprint refusal gets the fingerprint advice.
                if exc.code == grpc.StatusCode.FAILED_PRECONDITION and expected and "fingerprint" in str(exc).lower():
                    raise FingerprintMismatch(f"{exc}. {self._fingerprint_advice()}", exc.code) from None
                raise
            if expected and info.fingerprint != expected:
                raise FingerprintMismatch(
                    f"the server at {s.server} now has fingerprint {info.fingerprint[:12]}…, but this client joined "
                    f"with {expected[:12]}… (its image spec, schedule or classes changed). {self._fingerprint_advice()}"
                )
            try:
                validate_cut(s.cut, info.schedule.num_train_timesteps)
            except ValueError as exc:
                raise ConfigError(f"--cut: {exc}") from exc
            channels, height, width = info.image_shape
            if s.image_size is not None and s.image_size != height:
                raise ConfigError(
                    f"--image-size {s.image_size} does not match the server, which serves {height}x{width} images "
                    f"with {channels} channel(s); drop --image-size (images are converted to the server's size on "
                    "load) or start the server with the size you need"
                )
            self.ledger.set_fingerprint(info.fingerprint, s.server)
            write_json_atomic(self.workdir / SERVER_FILE, info.to_json())
        self._info = info
        self.report.update(
            server_id=info.server_id, fingerprint=info.fingerprint, image_shape=list(info.image_shape),
            num_train_timesteps=info.schedule.num_train_timesteps, server_classes=info.class_names, classes=classes,
        )
        log.info("registered as %s with %s (server %s, %dx%dx%d images, T=%d, cut %d, %d release(s) held)",
                 self.client_id, s.server, info.server_id, *info.image_shape, info.schedule.num_train_timesteps, s.cut,
                 info.releases_stored)
        return info

    def _fingerprint_advice(self) -> str:
        return (
            "The local model and releases were made for the old setup. Point --server at the original "
            "server, or start over: use a fresh --workdir, or run `collafuse-client forget` and then "
            "`collafuse-client reset --yes` in this one."
        )

    def server_info(self, allow_cached: bool = False) -> ServerInfo:
        """The server's reply: from this session, from ``server.json`` (offline steps), or a fresh Register."""
        if self._info is not None:
            return self._info
        cached = read_json(self.workdir / SERVER_FILE)
        if allow_cached and cached and cached.get("fingerprint") == self.ledger.fingerprint:
            try:
                self._info = ServerInfo.from_json(cached)
                validate_cut(self.settings.cut, self._info.schedule.num_train_timesteps)
                log.info("using the server setup cached in %s (fingerprint %s…)", SERVER_FILE, self._info.fingerprint[:12])
                return self._info
            except (KeyError, TypeError, ValueError):
                self._info = None
        return self.register()

    def load_data(self) -> LocalData:
        """The images converted to the server's spec, labels in the server's class order."""
        if self._data is not None:
            return self._data
        info = self.server_info(allow_cached=True)
        root = Path(self.settings.data or "")
        channels, size, _ = info.image_shape
        with self.report.phase("load_data"):
            dataset = load_image_folder(root, channels, size)
            labels = map_labels(dataset.class_names, info.class_names, root)
        self._data = LocalData(root, dataset, labels)
        self.report.update(num_images=len(dataset))
        log.info("loaded %d image(s) of %d class(es) from %s", len(dataset), len(set(dataset.class_names)), root)
        return self._data

    def release(self) -> ReleaseReport:
        """Upload x_cut for every image not yet released to this server (nothing at cut = T)."""
        s = self.settings
        info = self.server_info()
        data = self.load_data()
        with self.report.phase("release"):
            keys = self.ledger.image_keys(data.root, data.dataset.paths)
            # Releases are tracked per server identity (stable across restarts and address changes).
            released_here = len({r.image_key for r in self.ledger.releases() if r.server == info.server_id})
            # A server holding fewer of our releases than the ledger recorded lost (part of) its store, or
            # is a new one: resending is safe, the ledger's seeds make every payload byte-identical.
            resend = info.releases_stored < released_here and s.cut < info.schedule.num_train_timesteps
            if resend:
                log.warning("the server holds %d of the %d releases this client made to it; sending them again "
                            "(identical bytes, the server ignores those it has)", info.releases_stored, released_here)
            report = release_images(
                self.connection, self.ledger, client_id=self.client_id, images=data.dataset.images,
                labels=data.labels.tolist(), keys=keys, paths=data.dataset.paths, cut=s.cut, protocol=s.protocol,
                schedule=info.schedule, server=info.server_id, resend=resend,
            )
            self.report.update(release=report.to_json())
        return report

    def train(self) -> TrainResult:
        """Train the local model on t in [1, cut] (works offline once the server setup is cached)."""
        s = self.settings
        info = self.server_info(allow_cached=True)
        data = self.load_data()
        with self.report.phase("train"):
            result = train_local(
                images=data.dataset.images, labels=data.labels, num_classes=len(info.class_names),
                image_shape=info.image_shape, schedule=info.schedule, cut=s.cut, fingerprint=info.fingerprint,
                workdir=self.workdir, settings=s, device=self.device, show_progress=self.show_progress,
            )
            self.report.update(
                local_losses=[[step, loss] for step, loss in result.losses],
                local_train_steps=result.step,
                local_train_steps_this_run=result.steps_run,
                local_train_seconds=round(result.seconds, 4),
                local_model_parameters=result.parameters,
            )
        self.report.plot_losses(result.losses, f"{self.client_id}: local loss, cut {s.cut}")
        return result

    def wait_for_server(self) -> collafuse_pb2.TrainerState | None:
        """Poll Heartbeat until the server's trainer phase is 'done' (or time out with a clear error)."""
        s = self.settings
        info = self.server_info()
        if not s.wait_for_server:
            log.info("not waiting for the server's training (--no-wait-for-server)")
            return None
        if s.cut >= info.schedule.num_train_timesteps:
            log.info("cut = T: the client runs every sampling step, so the server's training is not needed")
            return None
        deadline = time.monotonic() + s.wait_timeout
        last_log = 0.0
        seen: set[str] = set()
        with self.report.phase("wait_for_server"), tqdm(
            desc="server training", unit="step", disable=progress_disabled(self.show_progress), leave=False
        ) as bar:
            while True:
                state = self.connection.heartbeat(self.client_id).trainer
                bar.total = state.max_steps or None
                bar.n = state.step
                bar.set_postfix(phase=state.phase, loss=f"{state.last_loss:.4f}")
                if state.phase == "done":
                    log.info("server training done at step %d (loss %.4f)", state.step, state.last_loss)
                    self.report.update(server_trainer_step=int(state.step), server_trainer_loss=float(state.last_loss))
                    return state
                if state.phase == "idle" and seen & {"waiting", "training"} and "idle" not in seen:
                    # 'idle' after training means the trainer stopped (an error, or the server is
                    # restarting); a restarted server resumes, so keep waiting but say so.
                    log.warning("the server's trainer went idle at step %d (stopped or restarting; see the server "
                                "log); still waiting up to --wait-timeout", state.step)
                seen.add(state.phase)
                now = time.monotonic()
                if now >= deadline:
                    raise ClientError(
                        f"the server's training did not finish within {s.wait_timeout:.0f}s (phase {state.phase!r}, "
                        f"step {state.step}/{state.max_steps}, {state.releases} releases from "
                        f"{state.clients_with_releases} client(s)); raise --wait-timeout, or pass "
                        "--no-wait-for-server to sample from the server's current model"
                    )
                if now - last_log >= WAIT_LOG_SECONDS:
                    log.info("waiting for the server's training: phase %s, step %d/%d, loss %.4f",
                             state.phase, state.step, state.max_steps, state.last_loss)
                    last_log = now
                self._sleep(min(self.poll_interval, max(0.0, deadline - now)))

    def generate(self) -> GenerateResult | None:
        """Server half over gRPC, client half locally; writes ``<workdir>/samples``."""
        s = self.settings
        info = self.server_info()
        if self._data is not None:
            present = self._data.labels.tolist()
        else:
            # Labels are all that sampling needs from the data: no pixels are read.
            root = Path(s.data or "")
            present = map_labels([c for _, c in self.scan()], info.class_names, root).tolist()
        with self.report.phase("generate"):
            result = generate_samples(
                self.connection, client_id=self.client_id, workdir=self.workdir, server=info, labels_present=present,
                settings=s, cut=s.cut, device=self.device, show_progress=self.show_progress,
            )
            server_steps, client_steps = count_model_evaluations(info.schedule, s.scheduler, s.inference_steps, s.cut)
            guidance = 1 if s.guidance_scale == 1.0 else 2
            self.report.update(
                model_evaluations_per_image={
                    "server": (result.server_steps if result else server_steps) * guidance,
                    "client": client_steps * guidance,
                },
                generate=result.to_json() if result else None,
                seconds_per_image=result.seconds_per_image if result else None,
            )
        return result

    def forget(self) -> int:
        """Ask the server to drop every release of this client; the ledger then refuses re-releases."""
        with self.report.phase("forget"):
            removed = int(self.connection.forget(self.client_id).removed)
            self.ledger.record_forget(self.server_info().server_id, removed)
        log.info("the server at %s removed %d release(s) of %s; releasing these images again now needs "
                 "`collafuse-client reset --yes`", self.settings.server, removed, self.client_id)
        return removed

    def status(self) -> dict[str, Any]:
        """The server's state (trainer, clients) beside this client's ledger summary."""
        reply = self.connection.status()
        return {
            "client_id": self.client_id,
            "server": MessageToDict(reply, preserving_proto_field_name=True),
            "ledger": self.ledger.summary(),
        }

    def reset(self) -> None:
        """Accept earlier releases and forgets: later releases are allowed again (audit history stays)."""
        self.ledger.reset()
        log.warning("ledger reset: images may be released again; where the cut changed, fresh noise is drawn, "
                    "and the server may then hold two noisy copies of an image")

    def run(self) -> dict[str, Any]:
        """The whole lifecycle; returns the metrics also written to ``<workdir>/metrics.json``."""
        started = time.perf_counter()
        self.scan()  # a bad --data fails before the server is contacted
        self.register()
        self.load_data()
        self.release()
        self.train()
        self.wait_for_server()
        self.generate()
        self.report.data["wall_seconds"]["total"] = round(time.perf_counter() - started, 4)
        self.report.update(ledger=self.ledger.summary())
        self._save_report()
        return dict(self.report.data)


def run_lifecycle(settings: ClientSettings, **kwargs: Any) -> dict[str, Any]:
    """Run join → release → train → wait → generate in this process; returns the metrics."""
    with ClientLifecycle(settings, **kwargs) as client:
        return client.run()
