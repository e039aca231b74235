"""Joining a TLS cluster: the coordinator client over HTTPS (verified against the cluster CA),
registration with a CSR, the switch from the join token to this worker's own credential, and
the renewal of its certificate before it ends.

[Note: enrolment]
1. With a credential kept from an earlier run the worker registers as itself; without one (or
   if the coordinator no longer knows it: 401) with the join token, and takes the credential the
   coordinator issues for its new id. Either way the request carries a CSR and the answer a
   certificate, which the peer server serves from its next handshake on.
2. From then on every request carries the worker credential, never the join token.
3. ``RenewalTask`` asks for a fresh certificate two thirds into the current one's life (and
   retries, a few seconds apart, until it gets one or the old one ends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from coordinator.models import CertificateOut, Registered
from worker.membership.client import CoordinatorClient, CoordinatorError
from worker.membership.identity import WorkerIdentity
from worker.membership.task import BackgroundTask

log = logging.getLogger(__name__)

RETRY_S = 5.0  # between failed renewals


class SecureClient(CoordinatorClient):
    """A CoordinatorClient over HTTPS that trusts only the cluster CA and acts with the worker
    credential once it has one."""

    def __init__(self, url: str, *, identity: WorkerIdentity, token: str | None = None,
                 **options: Any) -> None:
        super().__init__(url, token=token, **options)
        self.identity = identity
        self._join_token = token
        self._ssl = identity.ssl_context()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self._session

    async def _act_with(self, token: str | None) -> None:
        """Send ``token`` from the next request on (a new session: headers are per session)."""
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        await self.close()

    async def enrol(self, *, retry_for: float | None = None, **registration: Any) -> dict:
        """Register with a CSR (the note, step 1); installs credential and certificate."""
        me = self.identity
        await self._act_with(me.credential or self._join_token)
        try:
            raw = await self.register(**registration, csr=me.csr(), retry_for=retry_for)
        except CoordinatorError as exc:
            if exc.status != 401 or me.credential is None:
                raise
            log.warning("%s: the coordinator refused the kept credential (%s); registering "
                        "anew with the join token", self.worker_id, exc.message)
            me.adopt_credential(None)
            await self._act_with(self._join_token)
            raw = await self.register(**registration, csr=me.csr(), retry_for=retry_for)
        answer = Registered.model_validate(raw)
        if answer.credential:
            me.adopt_credential(answer.credential)
            await self._act_with(answer.credential)
        if answer.certificate is None:
            raise CoordinatorError(None, f"{self.url} registered {self.worker_id} but signed no "
                                         f"certificate: is it a TLS coordinator?")
        me.adopt_certificate(answer.certificate)
        return raw

    async def renew(self, *, retry_for: float | None = None) -> float:
        """A fresh certificate over this worker's key; returns its end (epoch seconds)."""
        raw = await self._request("POST", f"/workers/{self.worker_id}/certificate",
                                  body={"csr": self.identity.csr()}, retry_for=retry_for)
        answer = CertificateOut.model_validate(raw)
        self.identity.adopt_certificate(answer.certificate)
        return answer.not_after


class RenewalTask(BackgroundTask):
    """Keeps the worker's certificate fresh (the note, step 3); start and stop it on the
    client's loop."""

    name = "renewal"

    def __init__(self, client: SecureClient) -> None:
        self.client = client
        self.renewed = 0
        super().__init__()

    async def _run(self) -> None:
        identity = self.client.identity
        while True:
            at = identity.renew_at()
            await asyncio.sleep(RETRY_S if at is None else max(0.0, at - time.time()))
            if identity.renew_at() != at:  # renewed meanwhile (a re-registration)
                continue
            try:
                await self.client.renew(retry_for=RETRY_S)
                self.renewed += 1
            except Exception as exc:  # the old certificate still serves; try again soon
                log.warning("%s: certificate renewal failed: %s; retrying in %.0fs",
                            self.client.worker_id, exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
