"""Mutual TLS for the peer plane: this worker's key and certificate, and the cluster CA that
every peer's certificate must be signed by, on both sides of every connection.

The material may change while the server runs (a renewed certificate): the server asks for it
at each new handshake (``grpc.dynamic_ssl_server_credentials``), and the transport opens new
client channels when its ``epoch`` moved (grpc_transport.py). Connections already open carry
on: TLS checks a certificate when a connection starts, not after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Material:
    """PEM bytes of this worker's private key and certificate and of the CA; ``epoch`` grows
    each time the certificate changes."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    epoch: int


class MutualTls:
    """Server and channel credentials over whatever ``material()`` holds now."""

    def __init__(self, material: Callable[[], Material]):
        self._material = material

    @property
    def epoch(self) -> int:
        return self._material().epoch

    def server_credentials(self) -> grpc.ServerCredentials:
        """Requires every client to present a certificate signed by the CA."""
        first = self._material()
        served = [first.epoch]

        def fetch():  # gRPC asks at each handshake; None keeps the configuration it has
            now = self._material()
            if now.epoch == served[0]:
                return None
            served[0] = now.epoch
            log.info("peer server: serving certificate epoch %d from now on", now.epoch)
            return _configuration(now)

        return grpc.dynamic_ssl_server_credentials(_configuration(first), fetch,
                                                   require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trusts the CA only, and presents this worker's certificate."""
        m = self._material()
        return grpc.ssl_channel_credentials(root_certificates=m.ca_pem, private_key=m.key_pem,
                                            certificate_chain=m.cert_pem)


def _configuration(m: Material):
    return grpc.ssl_server_certificate_configuration([(m.key_pem, m.cert_pem)],
                                                     root_certificates=m.ca_pem)
