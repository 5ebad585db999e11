"""The client's lifecycle: join, release, train locally, wait for the server, generate.

``ClientLifecycle`` holds what the steps share (settings, ledger, connection, the
server's reply, the metrics file) and exposes each step as a method, so the CLI's
sub-commands and an in-process simulation drive the same code:

    with ClientLifecycle(settings) as client:
        metrics = client.run()          # or client.register(), client.contribute(), ...

Each step's work lives in its own module, the lifecycle only strings them together and
records the metrics: joining.py (Register and its checks), local_data.py (images in the
server's spec), protocols/ (what each protocol sends), trainer.py (train_local), waiting.py (the
server's training), generate.py (generate_samples).

Order matters for privacy and for errors: the data folder is checked before the
server is contacted; the server's spec is checked before any image is loaded; the
ledger is consulted before any byte leaves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from google.protobuf.json_format import MessageToDict

from collafuse.client import joining
from collafuse.client.connection import ServerConnection, ServerInfo, tls_credentials
from collafuse.client.generate import GenerateResult, generate_samples
from collafuse.client.latent import encode_local_data, pixel_shape
from collafuse.client.ledger import Ledger
from collafuse.client.local_data import LocalData, load_local_data, map_labels
from collafuse.client.privacy_ledger import privacy_report
from collafuse.client.protocols import ContributionReport, client_protocol
from collafuse.client.report import RunReport
from collafuse.client.shared_model import fetch_initial_weights
from collafuse.client.trainer import TrainResult, train_local
from collafuse.client.waiting import POLL_SECONDS, wait_for_training
from collafuse.common.autoencoder import FrozenAutoencoder, data_bound
from collafuse.common.config import ClientSettings
from collafuse.common.data import UNLABELED, DataError, scan_image_folder
from collafuse.common.rpc import RetryPolicy
from collafuse.common.runtime import resolve_device
from collafuse.common.schedule import Cut
from collafuse.common.settings import ConfigError
from collafuse.v1 import collafuse_pb2

log = logging.getLogger(__name__)


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
        self._server_done: collafuse_pb2.TrainerState | None = None  # once seen done (--init-from-server waits early)
        self._autoencoder: FrozenAutoencoder | None = None
        self.poll_interval = poll_interval
        self.show_progress = show_progress
        self._sleep = sleep

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def connection(self) -> ServerConnection:
        if self._connection is None:
            s = self.settings
            policy = RetryPolicy(wait_timeout=s.wait_timeout, attempts=s.retries or None)
            credentials = tls_credentials(s.tls_cert, s.tls_key, s.tls_ca)
            self._connection = ServerConnection(s.server, s.token, policy, s.rpc_timeout, credentials=credentials)
        return self._connection

    @property
    def autoencoder(self) -> FrozenAutoencoder | None:
        """This client's --autoencoder, loaded once (None: pixel space)."""
        if self._autoencoder is None and self.settings.autoencoder is not None:
            self._autoencoder = joining.own_autoencoder(self.settings, self.device)
        return self._autoencoder

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
        """Join the server; check its fingerprint, cut range and image size against ours (client/joining.py)."""
        s = self.settings
        classes = self.class_names()
        with self.report.phase("register"):
            info = joining.register(self.connection, self.ledger, s, self.client_id, classes, self.workdir,
                                    autoencoder=self.autoencoder)
        self._info = info
        self.report.update(
            server_id=info.server_id, fingerprint=info.fingerprint, image_shape=list(info.image_shape),
            num_train_timesteps=info.schedule.num_train_timesteps, server_classes=info.class_names, classes=classes,
        )
        log.info("registered as %s with %s (server %s, %dx%dx%d images, T=%d, cut %d, %d release(s) held)",
                 self.client_id, s.server, info.server_id, *info.image_shape, info.schedule.num_train_timesteps, s.cut,
                 info.releases_stored)
        return info

    def server_info(self, allow_cached: bool = False) -> ServerInfo:
        """The server's reply: from this session, from the cached reply (offline steps), or a fresh Register."""
        if self._info is None and allow_cached:
            self._info = joining.cached_server_info(self.workdir, self.ledger.fingerprint, self.settings.cut)
            if self._info is not None:  # offline too, the autoencoder must be the one the server announced
                ae = self.autoencoder
                joining.check_autoencoder(self._info, ae.identity if ae is not None else None, self.settings.server)
        return self._info if self._info is not None else self.register()

    def load_data(self) -> LocalData:
        """The images converted to the server's spec, labels in the server's class order (client/local_data.py)."""
        if self._data is not None:
            return self._data
        info = self.server_info(allow_cached=True)
        with self.report.phase("load_data"):
            ae = self.autoencoder
            if ae is None:
                self._data = load_local_data(Path(self.settings.data or ""), info)
            else:  # encoded here, and the scale of the latents checked, before anything is released
                images = load_local_data(Path(self.settings.data or ""), info, pixel_shape(ae, info.image_shape))
                self._data = encode_local_data(images, ae)
        self.report.update(num_images=len(self._data.dataset))
        return self._data

    def contribute(self) -> ContributionReport:
        """Send what the protocol trains the server with (client/protocols/): ambient releases x_cut of every image
        not yet released to this server; split runs split steps until the server or the budget says stop.
        Nothing at cut = T."""
        s = self.settings
        info = self.server_info()
        data = self.load_data()
        with self.report.phase("contribute"):
            # Releases are tracked per server identity (stable across restarts and address changes).
            released_here = len({r.image_key for r in self.ledger.releases() if r.server == info.server_id})
            # A server holding fewer of our releases than the ledger recorded lost (part of) its store, or
            # is a new one: resending is safe, the ledger's seeds make every payload byte-identical.
            resend = info.releases_stored < released_here and Cut(s.cut, info.schedule.num_train_timesteps).server_steps
            if resend:
                log.warning("the server holds %d of the %d releases this client made to it; sending them again "
                            "(identical bytes, the server ignores those it has)", info.releases_stored, released_here)
            report = client_protocol(s.protocol, s).contribute(
                self.connection, self.ledger, client_id=self.client_id, images=data.dataset.images,
                labels=data.labels.tolist(), paths=data.dataset.paths, cut=s.cut, schedule=info.schedule,
                server=info.server_id, resend=resend, re_release=s.re_release_confirm, pixels=data.pixels,
            )
            self.report.update(contribution=report.to_json(), privacy=self.privacy())
        return report

    def train(self) -> TrainResult:
        """Train the local model on t in [1, cut + --handoff-margin] (works offline once the server setup is cached,
        except with --init-from-server: that waits for the server's training and fetches the shared model's weights
        first, so the local training follows the server's instead of running beside it)."""
        s = self.settings
        info = self.server_info(allow_cached=True)
        data = self.load_data()
        cut = s.handoff_cut(info.schedule.num_train_timesteps)
        init = None
        if s.init_from_server and not Cut(cut, info.schedule.num_train_timesteps).global_model:
            self.wait_for_server()  # the weights to start from are the trained ones
            with self.report.phase("fetch_model"):
                init = fetch_initial_weights(self.connection, self.client_id, info.image_shape, len(info.class_names))
            self.report.update(init_from_server={"preset": init.preset, "server_step": init.step,
                                                 "sha256": init.sha256})
        with self.report.phase("train"):
            result = train_local(
                images=data.dataset.images, labels=data.labels, num_classes=len(info.class_names),
                image_shape=info.image_shape, schedule=info.schedule, cut=cut, fingerprint=info.fingerprint,
                workdir=self.workdir, settings=s, device=self.device, show_progress=self.show_progress, init=init,
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
        """Poll Heartbeat until the server's trainer is done (client/waiting.py), where sampling needs it."""
        s = self.settings
        info = self.server_info()
        if not s.wait_for_server:
            log.info("not waiting for the server's training (--no-wait-for-server)")
            return None
        if Cut(s.handoff_cut(info.schedule.num_train_timesteps), info.schedule.num_train_timesteps).independent:
            log.info("cut = T: the client runs every sampling step, so the server's training is not needed")
            return None
        if self._server_done is not None:
            return self._server_done
        with self.report.phase("wait_for_server"):
            state = wait_for_training(self.connection, self.client_id, s.wait_timeout, poll_interval=self.poll_interval,
                                      show_progress=self.show_progress, sleep=self._sleep)
        self.report.update(server_trainer_step=int(state.step), server_trainer_loss=float(state.last_loss))
        self._server_done = state
        return state

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
                settings=s, cut=s.handoff_cut(info.schedule.num_train_timesteps), device=self.device,
                show_progress=self.show_progress,
                decode=self.autoencoder.decode_batched if self.autoencoder is not None else None,
            )
            self.report.update(
                model_evaluations_per_image=result.model_evaluations_per_image() if result else None,
                generate=result.to_json() if result else None,
                seconds_per_image=result.seconds_per_image if result else None,
            )
        return result

    def forget(self) -> int:
        """Ask the server to drop every release of this client; the ledger keeps them (forgetting does not un-send)."""
        with self.report.phase("forget"):
            removed = int(self.connection.forget(self.client_id).removed)
            self.ledger.record_forget(self.server_info().server_id, removed)
        log.info("the server at %s removed %d release(s) of %s; the ledger still counts them as "
                 "released, and releasing them again needs --re-release-confirm", self.settings.server, removed, self.client_id)
        return removed

    def status(self) -> dict[str, Any]:
        """The server's state (trainer, clients) beside this client's ledger summary."""
        reply = self.connection.status()
        return {
            "client_id": self.client_id,
            "server": MessageToDict(reply, preserving_proto_field_name=True),
            "ledger": self.ledger.summary(),
            "privacy": self.privacy(),
        }

    def privacy(self) -> dict[str, Any] | None:
        """Privacy spent, epsilon at --dp-delta (client/privacy_ledger.py); None before the server's image spec is known."""
        info = self._info or joining.cached_server_info(self.workdir, self.ledger.fingerprint, self.settings.cut)
        return None if info is None else privacy_report(self.ledger, self.settings.dp_delta, info.image_shape,
                                                            data_bound(self.settings.autoencoder is not None))

    def reset(self) -> None:
        """Forget the pinned server fingerprint, to join a server whose setup changed (releases, the pinned
        schedule and the noise floor stay: releasing an image again still needs --re-release-confirm)."""
        self.ledger.reset()
        log.warning("ledger reset: this client may join a server with another setup; every release stays recorded, "
                    "and the noise floor still applies")

    def run(self) -> dict[str, Any]:
        """The whole lifecycle; returns the metrics also written to ``<workdir>/metrics.json``."""
        started = time.perf_counter()
        self.scan()  # a bad --data fails before the server is contacted
        self.register()
        self.load_data()
        if self.settings.protocol == "split":
            # Split steps wait for each round's other clients: the local model trains meanwhile.
            with ThreadPoolExecutor(1, thread_name_prefix="local-train") as pool:
                training = pool.submit(self.train)
                self.contribute()
                training.result()
        else:
            self.contribute()
            self.train()
        self.wait_for_server()
        self.generate()
        self.report.data["wall_seconds"]["total"] = round(time.perf_counter() - started, 4)
        self.report.update(ledger=self.ledger.summary())
        self._save_report()
        return dict(self.report.data)
