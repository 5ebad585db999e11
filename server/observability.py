"""Prometheus metrics of a running server, on an HTTP port of their own (``--metrics-port``, 0 = off).

What an operator watches: the trainer (step, loss, phase), the store (releases, clients), every RPC
(started, handled by status code, latency), the sampling queue, traffic, auth denials, and the
process (RSS, CPU, open files; ``process_*`` from prometheus_client's collector, Linux only).

Each server has its own ``CollectorRegistry``: several in-process servers (the tests, the
simulation) never share or overwrite each other's series. The trainer and store are read at
scrape time, so nothing in the training loop changes. No label carries a client id: label values
are bounded (methods, codes, phases) and the endpoint, which has no authentication, does not
list who takes part.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.process_collector import ProcessCollector

from collafuse.common.enums import Phase, phase_name
from collafuse.common.rpc import Behavior, rewrap_handler
from collafuse.server.auth import AuthInterceptor
from collafuse.server.errors import PortInUse, StartupError

if TYPE_CHECKING:
    from collafuse.server.protocols.base import ServerProtocol
    from collafuse.server.sampler import Sampler
    from collafuse.server.store import ReleaseStore
    from collafuse.server.strikes import StrikeBook
    from collafuse.server.trainer import Trainer
    from collafuse.server.transcript import TranscriptInterceptor

log = logging.getLogger(__name__)

# Seconds; RPCs here range from a Heartbeat (sub-ms) to a Sample stream of minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
Traffic = Callable[[], tuple[int, int]]


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _service_and_method(full_method: str) -> tuple[str, str]:
    """``/collafuse.v1.CollaFuse/Register`` -> (``collafuse.v1.CollaFuse``, ``Register``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method


DEADLINE_SLACK_S = 0.1


def final_code(context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, as far as the handler's side can see it.

    ``abort()`` and ``set_code()`` leave their code on the context; a call whose client went away is
    CANCELLED (or DEADLINE_EXCEEDED once its deadline passed); any other exception is UNKNOWN, which
    is what gRPC answers for it.
    """
    code = _set_code(context)
    if code is not None:
        return code
    remaining = context.time_remaining()
    # A handler that returns after its deadline answers nobody: the client already has DEADLINE_EXCEEDED,
    # though is_active() can still read True then.
    if not context.is_active() or (remaining is not None and remaining <= 0):
        return dropped_code(context)
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


def _set_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """A non-OK code left by abort() or set_code(); gRPC may report OK for a call it terminated itself."""
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK else None


def dropped_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of a call that terminated before its handler finished: the client went away."""
    code = _set_code(context)
    if code is not None:
        return code
    # gRPC's deadline timer can fire a few ms before time_remaining() reaches 0 on its clock.
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class _Call:
    """One RPC being timed; ``finish`` records it once, whichever path ends it first."""

    def __init__(self, interceptor: RpcMetricsInterceptor, labels: tuple[str, str, str]) -> None:
        self._interceptor = interceptor
        self._labels = labels
        self._start = time.perf_counter()
        self._lock = threading.Lock()
        self._done = False
        interceptor.started.labels(*labels).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        labels = (*self._labels, code.name)
        self._interceptor.handled.labels(*labels).inc()
        self._interceptor.latency.labels(*labels).observe(time.perf_counter() - self._start)


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC when it starts and when it ends (by status code), and times it.

    Unary and streaming handlers alike: a response stream is timed until its last message or its
    error, and a call that ends without either (a stream the client dropped) is recorded as the
    call terminates. Metric names follow the usual ``grpc_server_*`` ones, so stock dashboards work.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("grpc_server_started", "RPCs started on the server", RPC_LABELS, registry=registry)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code", (*RPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds", "time from the start of an RPC to its status (response streams: "
            "to their last message)", (*RPC_LABELS, "grpc_code"), buckets=LATENCY_BUCKETS, registry=registry,
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED itself
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        labels = (_rpc_type(handler), *_service_and_method(method))
        streams_out = handler.response_streaming

        def wrap(inner: Behavior) -> Behavior:
            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                call = _Call(self, labels)
                # Fallback for calls that terminate before the handler returns or raises here (a dropped
                # stream, a passed deadline). It runs as the call terminates, when is_active() may still
                # read True, so it never reports OK.
                context.add_callback(lambda: call.finish(dropped_code(context)))
                try:
                    response = inner(request, context)
                except BaseException as exc:  # abort() raises too: its code is on the context
                    call.finish(final_code(context, exc))
                    raise
                if streams_out:
                    return _observed(response, call, context)
                call.finish(final_code(context, None))
                return response

            return behavior

        return rewrap_handler(handler, wrap)


def _observed(responses: Iterable[Any], call: _Call, context: grpc.ServicerContext) -> Iterator[Any]:
    try:
        yield from responses
    except BaseException as exc:  # GeneratorExit included: the stream was closed before its end
        call.finish(final_code(context, exc))
        raise
    call.finish(final_code(context, None))


class _ServerCollector:
    """Reads the trainer, store, sampler and interceptors when Prometheus scrapes."""

    def __init__(self, trainer: Trainer, store: ReleaseStore, sampler: Sampler, traffic: Traffic | None,
                 protocols: Sequence[ServerProtocol] = (), transcript: TranscriptInterceptor | None = None,
                 strikes: StrikeBook | None = None) -> None:
        self._trainer = trainer
        self._store = store
        self._sampler = sampler
        self._traffic = traffic
        self._protocols = list(protocols)
        self._transcript = transcript
        self._strikes = strikes
        self.auth: AuthInterceptor | None = None

    def collect(self) -> Iterator[Metric]:
        state = self._trainer.state()
        yield GaugeMetricFamily("collafuse_training_step", "training steps done by the server model", state.step)
        yield GaugeMetricFamily("collafuse_training_max_steps", "training steps planned (0: until stopped)",
                                state.max_steps)
        if state.last_loss is not None:
            yield GaugeMetricFamily("collafuse_training_loss", "loss of the latest training step", state.last_loss)
        yield GaugeMetricFamily("collafuse_training_skipped_steps", "steps skipped (non-finite loss or gradient)",
                                state.skipped_steps)
        yield GaugeMetricFamily("collafuse_training_clipped_steps", "updates the guard scaled down (a gradient "
                                "spike)", state.clipped_steps)
        yield GaugeMetricFamily("collafuse_training_refused_steps", "updates the guard refused or undid",
                                state.refused_steps)
        yield GaugeMetricFamily("collafuse_checkpoint_save_failures", "checkpoint saves that failed since the last "
                                "one that worked", state.save_failures)
        yield GaugeMetricFamily("collafuse_checkpoint_saved_step", "step of the newest checkpoint written",
                                state.saved_step)
        current = phase_name(state.phase)
        yield StateSetMetricFamily(
            "collafuse_training_phase", "the trainer's phase",
            {phase_name(v): phase_name(v) == current for v in Phase.DESCRIPTOR.values_by_number},
        )
        yield GaugeMetricFamily("collafuse_releases", "x_cut releases held by the store", state.releases)
        yield GaugeMetricFamily("collafuse_clients_with_releases", "clients with at least one release",
                                state.clients_with_releases)
        yield GaugeMetricFamily("collafuse_clients_registered", "clients registered", len(self._store.clients()))
        yield CounterMetricFamily("collafuse_release_conflicts", "release items refused: another payload under a "
                                  "stored key", self._store.release_conflicts)
        depth = getattr(self._sampler, "queue_depth", None)
        if depth is not None:
            yield GaugeMetricFamily("collafuse_sampling_queue_depth", "Sample requests waiting for or holding a "
                                    "sampling slot", depth() if callable(depth) else depth)
        if self._traffic is not None:
            received, sent = self._traffic()
            yield CounterMetricFamily("collafuse_received_bytes", "request payload bytes received", received)
            yield CounterMetricFamily("collafuse_sent_bytes", "response payload bytes sent", sent)
        if self._transcript is not None:
            yield CounterMetricFamily("collafuse_transcript_unrecorded", "messages served without a transcript line "
                                      "(the transcript's disk refused it; only calls that need no record)",
                                      self._transcript.unrecorded)
        if self._strikes is not None:
            yield CounterMetricFamily("collafuse_split_clients_dropped", "times a split client was dropped for "
                                      "--split-strike-cooldown after --split-max-strikes refused gradients in a row",
                                      self._strikes.dropped_total)
        for protocol in self._protocols:  # each protocol's own counters (split rounds, merged forwards)
            yield from protocol.metrics()
        if self.auth is not None:
            yield CounterMetricFamily("collafuse_auth_denied", "calls refused for no or a wrong token "
                                      "(before any other interceptor sees them)", self.auth.denied)


class ServerMetrics:
    """The registry of one server, its RPC interceptor, and the HTTP endpoint once ``serve`` is called."""

    def __init__(self, trainer: Trainer, store: ReleaseStore, sampler: Sampler, traffic: Traffic | None = None,
                 protocols: Sequence[ServerProtocol] = (), transcript: TranscriptInterceptor | None = None,
                 strikes: StrikeBook | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.interceptor = RpcMetricsInterceptor(self.registry)
        self._collector = _ServerCollector(trainer, store, sampler, traffic, protocols, transcript, strikes)
        self.registry.register(self._collector)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def instrument(self, interceptors: Sequence[grpc.ServerInterceptor]) -> list[grpc.ServerInterceptor]:
        """``interceptors`` with the RPC metrics placed right after authentication (which stays first).

        A call the auth interceptor refuses never reaches the ones after it; its count is exported
        as ``collafuse_auth_denied_total`` instead. Everything later (the request guard's
        INVALID_ARGUMENT included) is counted by code.
        """
        chain = list(interceptors)
        auth = [i for i, interceptor in enumerate(chain) if isinstance(interceptor, AuthInterceptor)]
        if auth:
            self._collector.auth = chain[auth[0]]  # type: ignore[assignment]
        chain.insert(auth[0] + 1 if auth else 0, self.interceptor)
        return chain

    @property
    def port(self) -> int | None:
        return self._http[0].server_port if self._http is not None else None

    def serve(self, host: str, port: int) -> int:
        """Start ``/metrics`` (any path answers) on ``host:port``; returns the port."""
        address = host.strip("[]")
        try:
            self._http = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"--metrics-port {port} is in use: pick another port, or 0 to turn metrics off") from None
            raise StartupError(f"cannot serve metrics on {host}:{port} ({exc}): check --host and --metrics-port") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self._http[0].server_port)
        return self._http[0].server_port

    def close(self) -> None:
        if self._http is None:
            return
        httpd, thread = self._http
        self._http = None
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5.0)
