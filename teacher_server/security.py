"""TLS, mutual TLS and bearer-token auth of the teacher service, both sides. Imports grpc only (no server
module): the client uses it too.

    # server (teacher_server/server.py)
    creds = server_credentials(cert, key, client_ca)     # None without TLS; with a client CA: mTLS
    interceptor = TokenAuthInterceptor(read_token_file(path))
    # client (teacher_server/client.py)
    tls = ClientSecurity.build(tls_ca=..., tls_cert=..., tls_key=..., auth_token_file=...)
    channel = tls.channel(target, options)               # secure or insecure; call metadata in tls.metadata

Tokens travel as gRPC's own token credentials send them: the call metadata `authorization: Bearer <token>`.
With TLS the client composes `grpc.access_token_call_credentials` with its channel credentials; without TLS
(loopback) gRPC refuses call credentials, so the client sends the same metadata on each call itself and logs
one warning that the token travels in plaintext. The server compares with `hmac.compare_digest`; a call
without the token or with another one gets UNAUTHENTICATED, naming neither. Health and reflection stay open
(probes and gRPC's client-side health checks carry no token). Files are read once, at start.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

log = logging.getLogger("asymkd.security")

AUTH_KEY = "authorization"
# Services answerable without a token: load balancers and orchestrators probe them.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
NO_TOKEN = "this teacher needs a bearer token (call metadata `authorization: Bearer <token>`); none was sent"
BAD_TOKEN = "the bearer token sent in `authorization` was not accepted"


def read_file(path: str | Path, what: str) -> bytes:
    """A credential file's bytes; ValueError naming `what` (a config key) when it cannot be read or is empty."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}={str(path)!r}: cannot read it ({e.strerror or e})") from None
    if not data.strip():
        raise ValueError(f"{what}={str(path)!r} is empty")
    return data


def read_token_file(path: str | Path, what: str = "auth_token_file") -> str:
    """The token in a file (surrounding whitespace and the trailing newline removed)."""
    token = read_file(path, what).decode("utf-8", errors="strict").strip()
    if any(c.isspace() for c in token):
        raise ValueError(f"{what}={str(path)!r}: the token must be one word (no spaces or line breaks)")
    return token


# ------------------------------------------------------------------------------------------------ server
def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS server credentials from PEM files; with `client_ca` clients must present a certificate it signed
    (mutual TLS). None when `cert` is empty (plaintext)."""
    if not cert:
        return None
    pair = (read_file(key, "tls_key"), read_file(cert, "tls_cert"))
    root = read_file(client_ca, "tls_client_ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def _deny(message: str):
    async def deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        del request_or_iterator  # never read: an unauthenticated payload is not parsed
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary/stream both ways) that answers UNAUTHENTICATED."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(_deny(message), request_deserializer=None, response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health and reflection must carry `authorization: Bearer <token>`; else UNAUTHENTICATED."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the auth token is empty")
        self._expected = f"Bearer {token}".encode()

    def _verdict(self, metadata) -> str | None:
        """None when the call is authorized, else the refusal's message."""
        sent = next((value for key, value in metadata or () if key == AUTH_KEY), None)
        if sent is None:
            return NO_TOKEN
        sent = sent.encode() if isinstance(sent, str) else bytes(sent)
        return None if hmac.compare_digest(sent, self._expected) else BAD_TOKEN

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        message = self._verdict(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if message is None or handler is None:  # an unknown method stays UNIMPLEMENTED
            return handler
        log.debug("refused %s: %s", method, message)
        return _refusal(handler, message)


# ------------------------------------------------------------------------------------------------ client
def client_token(auth_token_file: str | Path | None = None, auth_token_env: str | None = None) -> str | None:
    """The client's token: from a file, or from the environment variable named `auth_token_env`; None when
    neither is given. ValueError (naming the option) when the source is given but holds no token."""
    if auth_token_file and auth_token_env:
        raise ValueError("set auth_token_file or auth_token_env, not both")
    if auth_token_file:
        return read_token_file(auth_token_file)
    if auth_token_env:
        token = os.environ.get(auth_token_env, "").strip()
        if not token:
            raise ValueError(f"auth_token_env={auth_token_env!r}: the environment variable is unset or empty")
        return token
    return None


@dataclass(frozen=True)
class ClientSecurity:
    """How a client channel is secured: channel credentials (None = plaintext), the per-call metadata (the
    token, when it cannot travel as call credentials) and the channel options (target name override)."""

    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] | None = None
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(
        cls,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        auth_token_file: str | Path | None = None,
        auth_token_env: str | None = None,
        target: str = "",
    ) -> ClientSecurity:
        """TLS when `tls_ca` or a client certificate is given (`tls_ca`: the CA that signed the servers'
        certificates; None = the system's roots); `tls_cert` + `tls_key`: this client's certificate, for
        servers that require one (mutual TLS); `tls_server_name`: the name to verify the servers'
        certificates against when it is not the target's host (several `host:port` targets, an IP)."""
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together (this client's certificate and its key)")
        token = client_token(auth_token_file, auth_token_env)
        if not (tls_ca or tls_cert):
            if tls_server_name:
                raise ValueError("tls_server_name needs TLS: set tls_ca (or tls_cert + tls_key)")
            if token is None:
                return cls()
            log.warning(
                "the teacher auth token travels in plaintext to %s (no TLS): use it on loopback or a private "
                "network only, or set tls_ca",
                target or "the teacher",
            )
            return cls(metadata=((AUTH_KEY, f"Bearer {token}"),))
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_file(tls_ca, "tls_ca") if tls_ca else None,
            private_key=read_file(tls_key, "tls_key") if tls_key else None,
            certificate_chain=read_file(tls_cert, "tls_cert") if tls_cert else None,
        )
        if token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        options = (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
        return cls(credentials=creds, options=options)

    def aio_channel(self, target: str, options: list) -> grpc.aio.Channel:
        options = [*options, *self.options]
        if self.credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, self.credentials, options=options)

    def channel(self, target: str, options: list | None = None) -> grpc.Channel:
        """A blocking channel (health checks of a starting server, tests)."""
        options = [*(options or []), *self.options]
        if self.credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self.credentials, options=options)
