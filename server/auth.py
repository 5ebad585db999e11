"""Who is calling, and what it may do: per-client tokens, mutual-TLS identities, one interceptor.

Credentials (docs/design.md §7, "each participant acts only as itself"):

- ``--tokens FILE``: one line per client, ``<client-id> <hash>``; ``collafuse-token`` makes a
  token and appends its hash. A token is ``<client-id>.<secret>``, so the server finds the entry
  without trying every line; only hashes are stored (``sha256$...`` for the generated 256-bit
  secrets, where a slow hash adds nothing, or ``scrypt$...`` for secrets a person chose).
- ``--tls-cert/--tls-key/--tls-ca``: mutual TLS; the client certificate's common name or a
  subject alternative name is the caller's id. With tokens as well, both must name the same id.
- ``--operators ID ...``: identities that may see every client in Status (and nothing more).
- ``--token`` (deprecated, development only): one shared secret; whoever holds it may act as
  any client, as before per-client credentials existed.

``AuthInterceptor`` authenticates every CollaFuse RPC (unary and streaming; health and
reflection stay open for probes), refuses a request - or any chunk of a client stream - whose
``client_id`` is not the caller's, and makes the caller available to the handlers (``caller()``).

Guessing is made slow and uninformative: a token for an unknown client id costs what a wrong token for a known
one costs (``TokenTable.identify`` checks against a dummy hash of every scheme the table holds, so the time
tells nothing about which ids exist), and failed authentications are limited per peer address
(``FailureLimiter``: a burst of ``AUTH_FAILURE_BURST``, then one per ``AUTH_FAILURE_REFILL_S``; beyond it,
RESOURCE_EXHAUSTED with a retry hint and no token is checked). A token already verified is never slowed.
"""

from __future__ import annotations

import argparse
import base64
import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from collafuse.common.rpc import AUTH_METADATA_KEY, Behavior, rewrap_handler
from collafuse.server.errors import RequestRefused, StartupError, refuse
from collafuse.server.store import ClientRecord

log = logging.getLogger(__name__)

OPEN_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.", "/grpc.reflection.")
SCHEMES = ("sha256", "scrypt")
# scrypt cost for person-chosen secrets: ~16 MiB and tens of ms, once per token (verified tokens are cached).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_ID = re.compile(r"^\S+$")
# Failed authentications one peer address may make: a burst, then one more every refill interval.
AUTH_FAILURE_BURST = 32
AUTH_FAILURE_REFILL_S = 10.0
AUTH_PEERS_TRACKED = 10_000  # the least recently failing peers are forgotten beyond this


class AuthConfigError(StartupError):
    """A tokens file or credential combination the server cannot use; says what to fix."""


@dataclass(frozen=True)
class Identity:
    """The authenticated caller. ``names`` empty means unrestricted (no auth, or the shared dev token)."""

    names: frozenset[str] = frozenset()
    operator: bool = False

    @property
    def unrestricted(self) -> bool:
        return not self.names

    @property
    def client_id(self) -> str | None:
        return min(self.names) if self.names else None

    def may_act_as(self, client_id: str) -> bool:
        return self.unrestricted or client_id in self.names

    def may_see(self, client_id: str) -> bool:
        return self.operator or self.may_act_as(client_id)


UNRESTRICTED = Identity()
_CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("collafuse_caller", default=UNRESTRICTED)


def caller() -> Identity:
    """The identity of the RPC this thread is serving (unrestricted where no credentials are configured)."""
    return _CALLER.get()


@contextmanager
def acting_as(identity: Identity) -> Iterator[None]:
    token = _CALLER.set(identity)
    try:
        yield
    finally:
        try:
            _CALLER.reset(token)
        except ValueError:  # a streaming handler finalised from another thread: the next call sets it anew
            pass


# ---- tokens ---------------------------------------------------------------------------------------


def new_token(client_id: str) -> str:
    return f"{client_id}.{secrets.token_urlsafe(32)}"


def token_client_id(token: str) -> str:
    return token.rpartition(".")[0]


def _sha256(data: str) -> bytes:
    return hashlib.sha256(data.encode()).digest()


def hash_token(token: str, scheme: str = "sha256") -> str:
    if scheme == "sha256":
        return "sha256$" + _sha256(token).hex()
    if scheme == "scrypt":
        salt = os.urandom(16)
        digest = hashlib.scrypt(token.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        b64 = base64.b64encode
        return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"
    raise ValueError(f"unknown hash scheme {scheme!r}: use one of {SCHEMES}")


def verify_token(token: str, stored: str) -> bool:
    """Whether ``token`` matches the stored hash; digests are compared in constant time."""
    scheme, _, rest = stored.partition("$")
    if scheme == "sha256":
        expected = bytes.fromhex(rest)
        return hmac.compare_digest(_sha256(token), expected)
    if scheme == "scrypt":
        n, r, p, salt, digest = rest.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(token.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
        return hmac.compare_digest(got, expected)
    return False


def _check_hash(stored: str, where: str) -> None:
    scheme, _, rest = stored.partition("$")
    try:
        if scheme == "sha256":
            ok = len(bytes.fromhex(rest)) == 32
        elif scheme == "scrypt":
            n, r, p, salt, digest = rest.split("$")
            ok = int(n) > 1 and int(r) > 0 and int(p) > 0 and bool(base64.b64decode(salt)) and bool(base64.b64decode(digest))
        else:
            ok = False
    except ValueError:
        ok = False
    if not ok:
        raise AuthConfigError(f"{where}: not a token hash ('sha256$<64 hex>' or 'scrypt$n$r$p$salt$hash'); "
                              "make entries with collafuse-token, never store the token itself")


@dataclass
class TokenTable:
    """client id -> token hash, read from a tokens file; ``identify`` maps a presented token to its id."""

    hashes: dict[str, str]
    path: Path | None = None
    _verified: dict[bytes, str] = field(default_factory=dict, repr=False)
    _dummies: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._dummies = dummy_hashes(self.hashes.values())

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise AuthConfigError(f"--tokens {path}: cannot read it ({exc.strerror}); make it with collafuse-token") from None
        hashes: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            where = f"--tokens {path}, line {number}"
            parts = text.split()
            if len(parts) != 2:
                raise AuthConfigError(f"{where}: expected '<client-id> <hash>', got {len(parts)} fields")
            client_id, stored = parts
            if client_id in hashes:
                raise AuthConfigError(f"{where}: client id {client_id!r} appears twice; keep one line per client")
            _check_hash(stored, where)
            hashes[client_id] = stored
        if not hashes:
            raise AuthConfigError(f"--tokens {path} holds no entries: add one per client with collafuse-token")
        return cls(hashes, Path(path))

    def verified(self, token: str) -> str | None:
        """The client id of a token verified before (no hashing work), or None."""
        known = self._verified.get(_sha256(token))
        return known if known is not None and known in self.hashes else None

    def identify(self, token: str) -> str | None:
        """The client id the token belongs to, or None.

        Every check of a token not verified before does the same work whatever its id: one verification per hash
        scheme the table holds (the id's own entry where it exists, a dummy hash for the others), so the time a
        refusal takes tells nothing about which client ids exist or how their tokens are stored.
        """
        known = self.verified(token)
        if known is not None:
            return known
        client_id = token_client_id(token)
        stored = self.hashes.get(client_id)
        scheme = stored.partition("$")[0] if stored is not None else None
        ok = verify_token(token, stored) if stored is not None else False
        for other, dummy in self._dummies.items():
            if other != scheme:
                verify_token(token, dummy)
        if not ok:
            return None
        self._verified[_sha256(token)] = client_id
        return client_id


def dummy_hashes(stored: Iterable[str]) -> dict[str, str]:
    """A hash per scheme in ``stored`` that no token matches, at that scheme's cost (scrypt: the most used
    parameters), to check a token for an unknown id against."""
    stored = list(stored)
    schemes = [h.partition("$")[0] for h in stored]
    dummies: dict[str, str] = {}
    if "sha256" in schemes:
        dummies["sha256"] = "sha256$" + secrets.token_hex(32)
    params = Counter(tuple(h.split("$")[1:4]) for h in stored if h.startswith("scrypt$"))
    if params:
        (n, r, p), _ = params.most_common(1)[0]
        b64 = base64.b64encode
        dummies["scrypt"] = f"scrypt${n}${r}${p}${b64(os.urandom(16)).decode()}${b64(os.urandom(64)).decode()}"
    return dummies


def add_token(path: Path, client_id: str, scheme: str = "sha256", replace: bool = False) -> str:
    """Append a fresh token's hash for ``client_id`` to the tokens file; returns the token (shown once)."""
    if not _ID.match(client_id) or "#" in client_id:
        raise AuthConfigError(f"client id {client_id!r} must be non-empty, without spaces or '#'")
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [client_id]]
    if len(kept) != len(lines) and not replace:
        raise AuthConfigError(f"{path} already has a token for {client_id!r}: pass --replace to issue a new one "
                              "(the old one stops working)")
    token = new_token(client_id)
    kept.append(f"{client_id} {hash_token(token, scheme)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(kept) + "\n")
    os.replace(tmp, path)
    return token


# ---- authentication -------------------------------------------------------------------------------


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> frozenset[str]:
    """The peer certificate's common name and subject alternative names (empty without one)."""
    values = [*auth_context.get("x509_common_name", ()), *auth_context.get("x509_subject_alternative_name", ())]
    return frozenset(v.decode() if isinstance(v, bytes) else str(v) for v in values)


@dataclass(frozen=True)
class Authenticator:
    tokens: TokenTable | None = None
    shared_token: str | None = None
    mtls: bool = False
    operators: frozenset[str] = frozenset()

    @classmethod
    def from_settings(
        cls, tokens: Path | None, shared_token: str | None, mtls: bool, operators: Sequence[str]
    ) -> Authenticator | None:
        """None when no credentials are configured (every caller is unrestricted)."""
        if tokens is not None and shared_token:
            raise AuthConfigError("give either --tokens FILE (one token per client) or the deprecated shared "
                                  "--token, not both")
        if shared_token:
            log.warning("--token is one shared secret: every holder may act as any client. Use --tokens FILE "
                        "(collafuse-token) or mutual TLS (--tls-ca) outside development")
        table = TokenTable.load(tokens) if tokens is not None else None
        if table is None and not shared_token and not mtls:
            if operators:
                raise AuthConfigError("--operators needs per-client credentials (--tokens or --tls-ca) to mean anything")
            return None
        return cls(table, shared_token or None, mtls, frozenset(operators))

    def check_token(self, token: str | None) -> frozenset[str]:
        """The id a per-client token names (empty without per-client tokens); RequestRefused if refused.

        Needs only the call's metadata, so a refused call is answered before its message is parsed.
        """
        if self.tokens is not None:
            if not token:
                raise RequestRefused(grpc.StatusCode.UNAUTHENTICATED,
                                     "missing token: pass --token (COLLAFUSE_TOKEN) with the token collafuse-token "
                                     "made for this client id")
            owner = self.tokens.identify(token)
            if owner is None:
                raise RequestRefused(grpc.StatusCode.UNAUTHENTICATED,
                                     "token not accepted: it is wrong, revoked or for another server; ask the "
                                     "operator for a new one (collafuse-token)")
            return frozenset({owner})
        if self.shared_token is not None and (
            not token or not hmac.compare_digest(_sha256(token), _sha256(self.shared_token))
        ):
            raise RequestRefused(grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or wrong token: pass --token (COLLAFUSE_TOKEN) as the server's")
        return frozenset()

    def verified(self, token: str | None) -> frozenset[str] | None:
        """``check_token``'s answer when it needs no hashing work and accepts (a per-client token verified before,
        the shared token, or no tokens configured); None when the token must be checked in full."""
        if self.tokens is not None:
            owner = self.tokens.verified(token) if token else None
            return frozenset({owner}) if owner is not None else None
        try:
            return self.check_token(token)
        except RequestRefused:
            return None

    def identify(self, token_names: frozenset[str], auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
        """The caller, from its token's id and its certificate's names (which must agree)."""
        names = token_names
        if self.mtls:
            cert_names = certificate_names(auth_context)
            if not cert_names:
                raise RequestRefused(grpc.StatusCode.UNAUTHENTICATED,
                                     "no client certificate: pass --tls-cert/--tls-key issued for this client id "
                                     "(collafuse-tls issue --client-id ID)")
            if token_names and not token_names <= cert_names:
                raise RequestRefused(grpc.StatusCode.PERMISSION_DENIED,
                                     f"the token belongs to {min(token_names)!r} but the certificate names "
                                     f"{sorted(cert_names)}: use the token and certificate issued for one client id")
            names = token_names or cert_names
        return Identity(names, operator=bool(names & self.operators))


def check_client_id(identity: Identity, request: Any, context: grpc.ServicerContext) -> None:
    """PERMISSION_DENIED when a request names a client other than the caller."""
    client_id = getattr(request, "client_id", "")
    if isinstance(client_id, str) and client_id and not identity.may_act_as(client_id):
        refuse(context, RequestRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"this credential is for client {identity.client_id!r}, not {client_id!r}: a client may act only as "
            "itself (run with --client-id set to the id of your token or certificate)",
        ))


def _raw(data: bytes) -> bytes:
    return data


def peer_address(peer: str) -> str:
    """The address part of gRPC's ``context.peer()`` ("ipv4:10.0.0.5:53122" -> "ipv4:10.0.0.5"): every
    connection of one host counts as one peer."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


class FailureLimiter:
    """Failed authentications per peer address, as a token bucket: ``burst`` failures at once, then one more every
    ``refill_s`` seconds. ``wait`` says how long a peer must wait before its next attempt is checked at all."""

    def __init__(self, burst: int | None = None, refill_s: float | None = None, max_peers: int = AUTH_PEERS_TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(AUTH_FAILURE_BURST if burst is None else burst)
        self.refill_s = AUTH_FAILURE_REFILL_S if refill_s is None else refill_s
        self.max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (allowance, as of)

    def _allowance(self, peer: str, now: float) -> float:
        left, since = self._peers.get(peer, (self.burst, now))
        return min(self.burst, left + (now - since) / self.refill_s)

    def wait(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: now)."""
        with self._lock:
            now = self._clock()
            left = self._allowance(peer, now)
        return 0.0 if left >= 1.0 else (1.0 - left) * self.refill_s

    def fail(self, peer: str) -> None:
        with self._lock:
            now = self._clock()
            self._peers[peer] = (self._allowance(peer, now) - 1.0, now)
            self._peers.move_to_end(peer)
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every CollaFuse call and checks the ``client_id`` of every request message.

    Install it outermost: a refused call then never reaches the request guard or the transcript. A token verified
    before is admitted at once; any other is checked in the call's handler thread, where the peer is known: a peer
    past its failure allowance is answered RESOURCE_EXHAUSTED with a retry hint before any hashing, and a refused
    call's payload is never parsed.
    """

    def __init__(self, authenticator: Authenticator, limiter: FailureLimiter | None = None) -> None:
        self._auth = authenticator
        self._limiter = limiter or FailureLimiter()
        self._lock = threading.Lock()
        self.denied = 0  # calls refused before their message was parsed (no or a wrong token)
        self.limited = 0  # calls refused because their peer failed too often (RESOURCE_EXHAUSTED)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        raw_token = metadata.get(AUTH_METADATA_KEY)
        token = raw_token if isinstance(raw_token, str) else None
        token_names = self._auth.verified(token)
        if token_names is not None:
            return rewrap_handler(handler, lambda inner: self._guarded(handler, inner, token_names))
        # No deserializer: the payload is parsed only once the token is accepted.
        return rewrap_handler(handler, lambda inner: self._checked(handler, inner, method, token),
                              request_deserializer=_raw)

    def _admit(self, token: str | None, method: str, context: grpc.ServicerContext) -> frozenset[str]:
        """The token's names, or the call ended: RESOURCE_EXHAUSTED for a peer past its allowance, the refusal for
        a missing or wrong token (counted against the peer)."""
        peer = peer_address(context.peer() or "")
        wait = self._limiter.wait(peer)
        if wait > 0:
            with self._lock:
                self.limited += 1
            refuse(context, RequestRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed authentications from {peer}: no token is checked for {wait:.0f}s; retry then with "
                "the token collafuse-token made for this client id",
                retry_after_s=wait,
            ))
        try:
            return self._auth.check_token(token)
        except RequestRefused as refused:
            self._limiter.fail(peer)
            with self._lock:
                self.denied += 1
                denied = self.denied
            log.warning("denied %s from %s: %s (%d denied calls so far)", method, peer, refused.code.name, denied)
            refuse(context, refused)

    def _checked(self, handler: grpc.RpcMethodHandler, inner: Behavior, method: str, token: str | None) -> Behavior:
        parse = handler.request_deserializer or _raw

        def admitted(request: Any, context: grpc.ServicerContext) -> tuple[Behavior, Any]:
            names = self._admit(token, method, context)
            if handler.request_streaming:
                parsed: Any = (parse(raw) for raw in request)
            else:
                parsed = parse(request)
            return self._guarded(handler, inner, names), parsed

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            behavior, parsed = admitted(request, context)
            return behavior(parsed, context)

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            behavior, parsed = admitted(request, context)
            yield from behavior(parsed, context)

        return streaming if handler.response_streaming else unary

    def _guarded(self, handler: grpc.RpcMethodHandler, inner: Behavior, token_names: frozenset[str]) -> Behavior:
        auth = self._auth

        def identify(request: Any, context: grpc.ServicerContext) -> tuple[Identity, Any]:
            """The caller, and the request (a client stream wrapped so every message is checked)."""
            try:
                identity = auth.identify(token_names, context.auth_context())
            except RequestRefused as refused:
                refuse(context, refused)
            if not handler.request_streaming:
                check_client_id(identity, request, context)
                return identity, request

            def checked() -> Iterator[Any]:
                for message in request:  # every chunk, before the handler sees it
                    check_client_id(identity, message, context)
                    yield message

            return identity, checked()

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            identity, request = identify(request, context)
            with acting_as(identity):
                return inner(request, context)

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # A generator, so the identity is set in the thread and for as long as gRPC iterates the responses.
            identity, request = identify(request, context)
            with acting_as(identity):
                yield from inner(request, context)

        return streaming if handler.response_streaming else unary


# ---- what a client may sample ---------------------------------------------------------------------


def sample_scope_error(
    record: ClientRecord, labels: Sequence[int], cut: int, served: Sequence[str], clients: Sequence[ClientRecord],
    counts: Mapping[str, int],
) -> str | None:
    """Why a Sample request reaches beyond the caller's registration, or None (docs/design.md §7).

    Only the registered classes (the null label, an unconditional sample of every class, only for a
    client that registered all of them), at the registered cut or at a cut the server has trained:
    never below the lowest cut of a client whose releases it holds.
    """
    null = len(served)
    own = set(record.class_names)
    for i, label in enumerate(labels):
        if label == null and not own >= set(served):
            return (f"labels[{i}]: the null label samples every class, and client {record.client_id!r} registered "
                    f"only {sorted(own)}; ask for those classes' labels")
        if label < null and served[label] not in own:
            return (f"labels[{i}]: class {served[label]!r} is not among the classes client {record.client_id!r} "
                    f"registered {sorted(own)}; a client samples only its own classes")
    if cut == record.cut:
        return None
    trained = [c.cut for c in clients if counts.get(c.client_id, 0) > 0]
    floor = min(trained) if trained else None
    if floor is None or cut < floor:
        below = f"below {floor}, the lowest cut it holds releases for" if floor is not None else "before any release"
        return (f"cut {cut}: client {record.client_id!r} registered cut {record.cut}, and the server has not "
                f"trained {below}; ask for cut {record.cut}")
    return None


# ---- collafuse-token --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collafuse-token",
        description="Issue a per-client token: stores its hash in the server's --tokens FILE and prints the token "
        "once (give it to that client as --token / COLLAFUSE_TOKEN).",
    )
    parser.add_argument("--tokens", type=Path, required=True, help="the server's tokens file (created if missing)")
    parser.add_argument("--client-id", required=True, help="the id the client runs with (--client-id)")
    parser.add_argument("--scheme", choices=SCHEMES, default="sha256", help="hash stored at rest")
    parser.add_argument("--replace", action="store_true", help="replace the client's existing token")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = add_token(args.tokens, args.client_id, args.scheme, args.replace)
    log.info("token for %r added to %s; the server reads it at start", args.client_id, args.tokens)
    sys.stdout.write(token + "\n")  # the secret itself goes to stdout only, for a pipe or a secrets store
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from collafuse.common.runtime import run_cli, setup_logging

    setup_logging("INFO", "token")
    return run_cli(lambda: run(argv), expected=(AuthConfigError,))


if __name__ == "__main__":
    raise SystemExit(main())
