"""This worker's identity in a TLS cluster: the CA it trusts, its private key (made here and
never sent anywhere), the short-lived certificate the coordinator signs for its worker id, and
the worker credential it acts with (coordinator/roles.py).

The CA comes from ``--ca FILE`` or from the coordinator itself, accepted only if its SHA-256
equals ``--ca-fingerprint`` (fetched over TLS without verification: the pin is the check).
Key, certificate and credential are kept in the identity directory (0700, secrets 0600), so a
restarted worker re-registers as itself instead of being refused as another identity (409).
Until the coordinator signs a certificate the peer server presents a self-signed placeholder,
which every peer refuses.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import os
import ssl
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlparse

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from communication.mtls import Material, MutualTls

log = logging.getLogger(__name__)

KEY_FILE, CERT_FILE, CREDENTIAL_FILE = "key.pem", "cert.pem", "credential"
RENEW_AT = 2 / 3  # of a certificate's life, renewal starts
FETCH_TIMEOUT_S = 10.0


class IdentityError(RuntimeError):
    """The CA or the worker's own files could not be had or trusted (named)."""


def normal_fingerprint(text: str) -> str:
    """``sha256:AB:CD...`` or ``abcd...`` -> 64 lowercase hex digits; ValueError otherwise."""
    hexed = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(hexed) != 64 or any(c not in "0123456789abcdef" for c in hexed):
        raise ValueError(f"--ca-fingerprint {text!r}: expected 64 hex digits (SHA-256), as the "
                         f"coordinator prints it")
    return hexed


def fingerprint_of(ca_pem: bytes) -> str:
    return x509.load_pem_x509_certificate(ca_pem).fingerprint(hashes.SHA256()).hex()


def fetch_ca(url: str, fingerprint: str, *, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """The CA certificate from ``url``/ca, accepted only if its SHA-256 is ``fingerprint``."""
    expected = normal_fingerprint(fingerprint)
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    where = url.rstrip("/") + "/ca"
    try:
        with urllib.request.urlopen(where, timeout=timeout, context=unverified) as answer:
            pem = answer.read(64 << 10)
        actual = fingerprint_of(pem)
    except (OSError, ValueError) as exc:
        raise IdentityError(f"could not fetch the CA from {where}: {exc}") from None
    if not hmac.compare_digest(actual, expected):
        raise IdentityError(f"the CA served by {where} has sha256 {actual}, expected {expected} "
                            f"(--ca-fingerprint): refusing it; a wrong fingerprint, or someone "
                            f"between this worker and the coordinator")
    return pem


def default_directory(ca_pem: bytes, worker_id: str) -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "zerop2p" / "identities" / fingerprint_of(ca_pem)[:16] / quote(worker_id, safe="")


def open_identity(url: str, worker_id: str, *, ca: str | None = None,
                  ca_fingerprint: str | None = None,
                  directory: str | None = None) -> WorkerIdentity | None:
    """This worker's identity for the coordinator at ``url``: None for plain ``http://``."""
    https = urlparse(url).scheme == "https"
    if not https:
        if ca or ca_fingerprint:
            raise IdentityError(f"--ca/--ca-fingerprint need an https:// coordinator URL, not "
                                f"{url}")
        return None
    if ca:
        try:
            pem = Path(ca).read_bytes()
            actual = fingerprint_of(pem)
        except (OSError, ValueError) as exc:
            raise IdentityError(f"--ca {ca}: not a readable PEM certificate ({exc})") from None
        if ca_fingerprint and actual != normal_fingerprint(ca_fingerprint):
            raise IdentityError(f"--ca {ca} has sha256 {actual}, not --ca-fingerprint "
                                f"{normal_fingerprint(ca_fingerprint)}")
    elif ca_fingerprint:
        pem = fetch_ca(url, ca_fingerprint)
    else:
        raise IdentityError(f"{url} is https: give the cluster CA, --ca FILE or "
                            f"--ca-fingerprint HEX (the coordinator prints it)")
    return WorkerIdentity(worker_id, ca_pem=pem,
                          directory=Path(directory) if directory else default_directory(
                              pem, worker_id))


def _write(path: Path, data: bytes, *, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class WorkerIdentity:
    """Key, certificate and credential of ``worker_id``, kept in ``directory``; ``material``
    (thread-safe) is what the peer plane's mutual TLS presents right now."""

    def __init__(self, worker_id: str, *, ca_pem: bytes, directory: Path):
        self.worker_id = worker_id
        self.ca_pem = ca_pem
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self.directory = directory
        self._lock = threading.Lock()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_file = directory / KEY_FILE
        if key_file.exists():
            self._key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            _write(key_file, self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), private=True)
        self._key_pem = key_file.read_bytes()
        self.cert: x509.Certificate | None = None
        self._renew_at: float | None = None
        self._material = Material(self._key_pem, self._placeholder(), ca_pem, epoch=0)
        kept = directory / CERT_FILE
        if kept.exists():
            try:
                self.adopt_certificate(kept.read_text(), keep=False)
            except IdentityError as exc:  # another CA's, or expired: a fresh one comes
                log.info("%s: not using the kept certificate: %s", worker_id, exc)
        cred = directory / CREDENTIAL_FILE
        self.credential = (cred.read_text().strip() or None) if cred.exists() else None

    def _placeholder(self) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zerop2p uncertified")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now()).not_valid_after(_now() + datetime.timedelta(days=1))
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def material(self) -> Material:
        return self._material

    def peer_tls(self) -> MutualTls:
        return MutualTls(self.material)

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the coordinator's HTTPS certificate against the cluster CA (and its name)."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def csr(self) -> str:
        """A request for a certificate over this worker's key (the coordinator writes the
        names itself, from the id it authenticated)."""
        cn = self.worker_id if len(self.worker_id) <= 64 else "zerop2p worker"
        request = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .sign(self._key, hashes.SHA256()))
        return request.public_bytes(serialization.Encoding.PEM).decode()

    def adopt_certificate(self, pem: str, *, keep: bool = True) -> None:
        """Serve ``pem`` from now on; IdentityError unless the CA signed it, over this key,
        and it is valid now."""
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise IdentityError(f"{self.worker_id}: certificate not signed by the cluster CA "
                                f"({exc or type(exc).__name__})") from None
        if cert.public_key().public_numbers() != self._key.public_key().public_numbers():
            raise IdentityError(f"{self.worker_id}: certificate is not for this worker's key")
        if not cert.not_valid_before_utc <= _now() < cert.not_valid_after_utc:
            raise IdentityError(f"{self.worker_id}: certificate valid from "
                                f"{cert.not_valid_before_utc} to {cert.not_valid_after_utc}, "
                                f"not now")
        end = cert.not_valid_after_utc.timestamp()
        with self._lock:
            self.cert = cert
            self._renew_at = time.time() + RENEW_AT * max(0.0, end - time.time())
            self._material = Material(self._key_pem, pem.encode(), self.ca_pem,
                                      epoch=self._material.epoch + 1)
        if keep:
            _write(self.directory / CERT_FILE, pem.encode(), private=False)
        log.info("%s: certificate serial %x valid until %s", self.worker_id, cert.serial_number,
                 cert.not_valid_after_utc.isoformat(timespec="seconds"))

    def adopt_credential(self, token: str | None) -> None:
        """Act with ``token`` from now on (None: forget the kept one)."""
        self.credential = token
        path = self.directory / CREDENTIAL_FILE
        if token is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, token.encode(), private=True)

    def renew_at(self) -> float | None:
        """When (epoch seconds) to ask for the next certificate: two thirds of the way from
        when this one was adopted to its end (None: no certificate yet)."""
        return self._renew_at
