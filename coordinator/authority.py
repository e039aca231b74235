"""The cluster's certificate authority: a CA key and certificate, the coordinator's own HTTPS
certificate, and short-lived worker certificates signed from their CSRs.

[Note: worker identities]
A worker's certificate names its worker id twice, in its subjectAltName:
- ``urn:zerop2p:worker:<id, percent-encoded>``: what a peer server reads out of the TLS
  handshake (``auth_context()['peer_uri']``) to learn who is pushing;
- ``<first 32 hex digits of sha256(id)>.worker.zerop2p``: a DNS name a peer client checks the
  server against (``grpc.ssl_target_name_override``), so a client knows it reached the worker
  it meant to, not merely some member of the cluster.
The coordinator takes only the public key from a CSR (whose signature proves the worker holds
the private key, which never leaves it) and writes the names itself, from the id the request
was authenticated as. ``communication/identity.py`` reads the same names;
``tests/test_tls_identity.py`` checks that both sides spell them alike. Worker certificates carry
no IP or host name, so one can never pass for the coordinator's HTTPS certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

URI_PREFIX = "urn:zerop2p:worker:"
DNS_SUFFIX = ".worker.zerop2p"
CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
SERVER_FILE, SERVER_KEY_FILE = "server.pem", "server.key"
CA_DAYS = 3650
SERVER_DAYS = 365
SERVER_RENEW_DAYS = 30  # an auto server certificate closer than this to its end is re-issued
BACKDATE = datetime.timedelta(minutes=5)  # room for clocks a little behind ours


class AuthorityError(ValueError):
    """TLS files that are missing, unreadable or do not belong together (named)."""


def worker_uri(worker_id: str) -> str:
    return URI_PREFIX + quote(worker_id, safe="")


def worker_dns_name(worker_id: str) -> str:
    return hashlib.sha256(worker_id.encode()).hexdigest()[:32] + DNS_SUFFIX


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER bytes, lowercase hex (what workers pin)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write via a temporary name and rename, so a crash never leaves half a key; keys 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthorityError(f"{what} {path}: not a readable PEM certificate ({exc})") from None


def _read_key(path: Path, what: str):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AuthorityError(f"{what} {path}: not a readable unencrypted PEM private key "
                             f"({exc})") from None


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


@dataclass(slots=True)
class CertificateAuthority:
    """The CA that signs worker certificates, and the files uvicorn serves HTTPS with."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path

    @property
    def ca_pem(self) -> bytes:
        return _pem(self.ca_cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ca_cert)

    @classmethod
    def auto(cls, directory: str | Path, *, hosts: list[str]) -> CertificateAuthority:
        """The CA in ``directory``, created on first use (and kept: restarts reuse it), with a
        server certificate for ``hosts``, re-issued when a host is missing from it or it
        nears its end."""
        root = Path(directory)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_file, ca_key_file = root / CA_FILE, root / CA_KEY_FILE
        if ca_file.exists() != ca_key_file.exists():
            raise AuthorityError(f"--tls-dir {root}: {CA_FILE} and {CA_KEY_FILE} must both "
                                 f"exist or neither (one is missing)")
        if ca_file.exists():
            ca_cert, ca_key = _read_cert(ca_file, "CA"), _read_key(ca_key_file, "CA key")
        else:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zerop2p cluster CA")])
            ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(_now() - BACKDATE)
                       .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
                       .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                       .add_extension(_usage(ca=True), critical=True)
                       .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                           ca_key.public_key()), critical=False)
                       .sign(ca_key, hashes.SHA256()))
            _write(ca_key_file, _key_pem(ca_key), private=True)
            _write(ca_file, _pem(ca_cert), private=False)
            log.info("created the cluster CA in %s (sha256 %s)", root, fingerprint(ca_cert))
        authority = cls(ca_cert, ca_key, ca_file, root / SERVER_FILE, root / SERVER_KEY_FILE)
        authority._check_pair()
        if not authority._server_fits(hosts):
            authority._issue_server(hosts)
        return authority

    @classmethod
    def from_files(cls, *, cert: str, key: str, ca: str, ca_key: str) -> CertificateAuthority:
        """Your own CA (certificate and key) and your own server certificate and key."""
        authority = cls(_read_cert(Path(ca), "--tls-ca"), _read_key(Path(ca_key), "--tls-ca-key"),
                        Path(ca), Path(cert), Path(key))
        authority._check_pair()
        server = _read_cert(Path(cert), "--tls-cert")
        _read_key(Path(key), "--tls-key")
        try:
            server.verify_directly_issued_by(authority.ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise AuthorityError(f"--tls-cert {cert} is not signed by --tls-ca {ca}") from None
        return authority

    def _check_pair(self) -> None:
        if self.ca_cert.public_key().public_numbers() != self.ca_key.public_key().public_numbers():
            raise AuthorityError(f"CA key does not belong to the CA certificate {self.ca_file}")

    def _server_fits(self, hosts: list[str]) -> bool:
        if not (self.server_cert_file.exists() and self.server_key_file.exists()):
            return False
        cert = _read_cert(self.server_cert_file, "server certificate")
        try:
            cert.verify_directly_issued_by(self.ca_cert)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        left = cert.not_valid_after_utc - _now()
        return set(_names(hosts)) <= set(san) and left > datetime.timedelta(days=SERVER_RENEW_DAYS)

    def _issue_server(self, hosts: list[str]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                            "zerop2p coordinator")]))
                .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - BACKDATE)
                .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
                .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        _write(self.server_key_file, _key_pem(key), private=True)
        _write(self.server_cert_file, _pem(cert), private=False)
        log.info("issued the coordinator's server certificate for %s", ", ".join(hosts))

    @staticmethod
    def read_csr(pem: str) -> x509.CertificateSigningRequest:
        """A CSR whose signature holds (its sender has the private key); ValueError saying
        what is wrong otherwise."""
        try:
            csr = x509.load_pem_x509_csr(pem.encode())
        except ValueError as exc:
            raise ValueError(f"not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise ValueError("the request's signature does not match its public key")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
            raise ValueError("the request's key must be an elliptic-curve key (P-256)")
        return csr

    def sign_worker(self, csr: x509.CertificateSigningRequest, worker_id: str, *,
                    lifetime: float) -> x509.Certificate:
        """A certificate for ``worker_id`` over the CSR's public key, valid ``lifetime`` s."""
        cn = worker_id if len(worker_id) <= 64 else worker_dns_name(worker_id)
        start = _now()
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.ca_cert.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start - BACKDATE)
                .not_valid_after(start + datetime.timedelta(seconds=lifetime))
                .add_extension(x509.SubjectAlternativeName([
                    x509.UniformResourceIdentifier(worker_uri(worker_id)),
                    x509.DNSName(worker_dns_name(worker_id))]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_usage(ca=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.ca_key, hashes.SHA256()))


def pem_of(cert: x509.Certificate) -> str:
    return _pem(cert).decode()
