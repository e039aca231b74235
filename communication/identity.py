"""Peer identities on the wire: the names a worker's certificate carries (coordinator/authority.py,
note "worker identities": the two sides must spell them alike, tests/test_tls_identity.py
checks), the worker id a TLS peer proved, and the check that a push's sender is who its
certificate says.

[Note: who may push]
With mutual TLS the peer server knows, from the handshake, which worker id is calling
(``peer_uri`` in ``context.auth_context()``), and from the generation which worker id each rank
is. A push is let in only if its header's ``sender`` rank is the caller's own rank in the
header's generation, and its ``origin`` (whose contribution it carries) is the sender itself,
or any rank when the sender is this rank's ring predecessor (ring.py forwards others' shards
one hop at a time, so only the predecessor ever does). Anything else is PERMISSION_DENIED,
naming the claimed rank, the certificate's id and the id expected, before any slot is touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from urllib.parse import unquote

import grpc

from communication.proto import zerop2p_pb2 as pb
from communication.refusal import PushRefused

URI_PREFIX = "urn:zerop2p:worker:"
DNS_SUFFIX = ".worker.zerop2p"


def worker_dns_name(worker_id: str) -> str:
    """The DNS name in ``worker_id``'s certificate: a client checks a peer server against it."""
    return hashlib.sha256(worker_id.encode()).hexdigest()[:32] + DNS_SUFFIX


def tls_worker_id(context) -> str | None:
    """The worker id the caller's client certificate names (None: no such certificate)."""
    auth = context.auth_context() or {}
    ids = {unquote(u.decode()[len(URI_PREFIX):]) for u in auth.get("peer_uri", ())
           if u.decode(errors="replace").startswith(URI_PREFIX)}
    return ids.pop() if len(ids) == 1 else None


class SenderCheck:
    """The note's rule for one peer server: ``members(generation)`` is that generation's worker
    ids by rank (None when it is not known here); ``rank()`` the receiving rank."""

    def __init__(self, members: Callable[[int], Sequence[str] | None], rank: Callable[[], int]):
        self._members = members
        self._rank = rank

    def check(self, h: pb.TensorHeader, context, *, known_only: bool = False) -> None:
        """Raise PushRefused(PERMISSION_DENIED) unless the caller may push ``h``. With
        ``known_only``, a generation whose members are not known yet passes (it is checked
        again once its slot opened, by when they are)."""
        members = self._members(h.generation)
        if members is None:
            if known_only:
                return
            self._deny(h, f"generation {h.generation}'s members are not known on this rank")
        caller = tls_worker_id(context)
        if not 0 <= h.sender < len(members):
            self._deny(h, f"certificate of {caller!r} claims sender rank {h.sender}, outside "
                          f"generation {h.generation}'s {len(members)} members")
        expected = members[h.sender]
        if caller != expected:
            named = "no worker id" if caller is None else f"worker id {caller!r}"
            self._deny(h, f"claimed sender rank {h.sender}, but the caller's certificate names "
                          f"{named}; rank {h.sender} of generation {h.generation} is {expected!r}")
        predecessor = (self._rank() - 1) % len(members)
        if h.origin != h.sender and h.sender != predecessor:
            self._deny(h, f"sender rank {h.sender} ({caller!r}) pushes origin rank {h.origin}'s "
                          f"contribution; only rank {predecessor}, this rank's ring "
                          f"predecessor, forwards others'")

    @staticmethod
    def _deny(h: pb.TensorHeader, why: str):
        raise PushRefused(grpc.StatusCode.PERMISSION_DENIED, f"key {h.key}: {why}")
