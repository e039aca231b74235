"""Which TLS the coordinator runs with, from its settings: none (plain HTTP, loopback
development), ``--tls auto`` (its own CA, made once and kept), or your own four files."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from coordinator.authority import AuthorityError, CertificateAuthority
from coordinator.config import Settings

OWN_FILES = ("tls_cert", "tls_key", "tls_ca", "tls_ca_key")


def tls_dir(settings: Settings) -> Path:
    """Where ``--tls auto`` keeps its files: ``--tls-dir``, or ``<db>.tls`` beside the database."""
    if settings.tls_dir:
        return Path(settings.tls_dir)
    if settings.db == ":memory:":
        raise AuthorityError("--tls auto with --db :memory: needs --tls-dir: the CA must "
                             "outlive the process, or every restart makes a new one")
    db = Path(settings.db)
    return db.with_name(db.name + ".tls")


def server_names(settings: Settings) -> list[str]:
    """Names the server certificate holds: loopback, this machine's names, the bound address
    unless it is a wildcard, and ``--tls-name``s."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    try:
        wildcard = ipaddress.ip_address(settings.host).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        names.append(settings.host)
    return list(dict.fromkeys(n for n in [*names, *settings.tls_names] if n))


def authority_from(settings: Settings) -> CertificateAuthority | None:
    """The coordinator's CA, or None in plain mode; AuthorityError naming the option at fault."""
    given = [name for name in OWN_FILES if getattr(settings, name)]
    if settings.tls == "auto":
        if given:
            raise AuthorityError(f"--tls auto makes its own files; drop "
                                 f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        return CertificateAuthority.auto(tls_dir(settings), hosts=server_names(settings))
    if not given:
        return None
    missing = [name for name in OWN_FILES if not getattr(settings, name)]
    if missing:
        raise AuthorityError(f"your own TLS files need all of --tls-cert, --tls-key, --tls-ca "
                             f"and --tls-ca-key (the CA key signs worker certificates); "
                             f"missing {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return CertificateAuthority.from_files(cert=settings.tls_cert, key=settings.tls_key,
                                           ca=settings.tls_ca, ca_key=settings.tls_ca_key)
