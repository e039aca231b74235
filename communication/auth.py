"""Cluster-token authentication and optional TLS for the peer gRPC server and client.

Every RPC carries ``authorization: Bearer <token>`` in its metadata; the server interceptor
refuses a missing or wrong token with UNAUTHENTICATED before any handler runs.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_HEADER = "authorization"


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client attaches to every call."""
    return ((TOKEN_HEADER, f"Bearer {token}"),) if token else ()


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    """Server certificate and key (PEM) for the server; the CA that signed it for clients."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    server_name: str | None = None  # override the name checked against the certificate

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert_file and self.key_file):
            raise ValueError("TLS server needs cert_file and key_file")
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca = Path(self.ca_file).read_bytes() if self.ca_file else None
        return grpc.ssl_channel_credentials(root_certificates=ca)


def _refuse(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that aborts with UNAUTHENTICATED."""

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            f"{method}: missing or wrong cluster token")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks the cluster token."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        got = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        got_bytes = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got_bytes, self._expected):
            return handler
        log.warning("refused %s: bad or missing token", handler_call_details.method)
        return _refuse(handler, handler_call_details.method)
