"""The coordinator as the cluster's certificate authority, with real processes and real
certificates: ``--tls auto`` makes its CA once and keeps it across a restart, serves HTTPS and
refuses plain HTTP; a worker gets a certificate for its id from a CSR, renews it before it
ends, and acts with its own credential; roles (coordinator/roles.py) refuse a worker acting on
another id (403) and a registration of a held id by another identity (409); a CA fetched
under a wrong fingerprint is refused."""

from __future__ import annotations

import datetime
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from coordinator.authority import AuthorityError, CertificateAuthority
from coordinator.config import Settings
from coordinator.tls import authority_from
from worker.cluster.launcher import URL_LINE, kill_all, spawn
from worker.membership.client import CoordinatorError
from worker.membership.facade import Membership
from worker.membership.identity import IdentityError, WorkerIdentity, fetch_ca, open_identity

JOIN, ADMIN = "join-token-for-tls", "admin-token-for-tls"
LIFETIME = 6.0  # seconds: renewal comes after 4
FINGERPRINT_LINE = "coordinator CA fingerprint sha256:"


def start(tmp: Path, *extra: str) -> tuple:
    """``python -m coordinator --tls auto`` on a free port: (child, url, fingerprint)."""
    argv = [sys.executable, "-m", "coordinator", "--port", "0", "--db", str(tmp / "c.db"),
            "--tls", "auto", "--cert-lifetime", str(LIFETIME), *extra]
    child, url = spawn("coordinator", argv, echo=False, wait_for=URL_LINE, timeout=60,
                       env={"ZEROP2P_TOKEN": JOIN, "ZEROP2P_ADMIN_TOKEN": ADMIN})
    for _ in range(200):
        found = [line for line in child.lines if line.startswith(FINGERPRINT_LINE)]
        if found:
            return child, url, found[0][len(FINGERPRINT_LINE):]
        time.sleep(0.05)
    kill_all([child])
    raise AssertionError(f"no fingerprint line: {child.lines}")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coordinator")
    child, url, fingerprint = start(tmp)
    yield url, fingerprint, tmp / "c.db.tls" / "ca.pem", tmp
    kill_all([child])


def http(url: str, ca: Path, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(ca)),
                        headers=headers, timeout=10)


def registration(worker_id: str, **more) -> dict:
    return {"worker_id": worker_id, "ip_address": "127.0.0.1", "port": 7000, **more}


@pytest.mark.timeout(60)
def test_the_ca_is_made_once_kept_across_a_restart_and_served_over_https_only(tmp_path):
    child, url, first = start(tmp_path)
    tls = tmp_path / "c.db.tls"
    kept = {p.name: p.read_bytes() for p in tls.iterdir()}
    assert set(kept) == {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert (tls / "ca.key").stat().st_mode & 0o077 == 0 and tls.stat().st_mode & 0o077 == 0
    kill_all([child])
    child, url, again = start(tmp_path)
    try:
        assert again == first and {p.name: p.read_bytes() for p in tls.iterdir()} == kept
        with http(url, tls / "ca.pem") as client:
            assert client.get("/healthz").json() == {"ok": True}
            pem = client.get("/ca").content  # public: no token
        ca = x509.load_pem_x509_certificate(pem)
        assert ca.fingerprint(hashes.SHA256()).hex() == first
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust our CA
            httpx.get(url + "/healthz", timeout=5)
    finally:
        kill_all([child])


@pytest.mark.timeout(60)
def test_a_worker_gets_a_certificate_for_its_id_and_roles_hold(coordinator, tmp_path):
    url, _, ca, _ = coordinator
    me = WorkerIdentity("alice", ca_pem=ca.read_bytes(), directory=tmp_path / "alice")
    with http(url, ca, JOIN) as join, http(url, ca, ADMIN) as admin:
        answer = join.post("/workers/register", json=registration("alice", csr=me.csr()))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        cert = x509.load_pem_x509_certificate(body["certificate"].encode())
        me.adopt_certificate(body["certificate"])  # signed by the CA, over alice's own key
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            "urn:zerop2p:worker:alice"]
        life = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        assert 0 < life.total_seconds() <= LIFETIME
        alice_token = body["credential"]
        bob = join.post("/workers/register", json=registration("bob")).json()["credential"]
        assert alice_token and bob and alice_token != bob
        with http(url, ca, alice_token) as alice, http(url, ca, bob) as as_bob:
            assert alice.post("/workers/alice/heartbeat", json={}).status_code == 200
            for refused in (alice.delete("/workers/bob"),
                            alice.post("/workers/bob/heartbeat", json={}),
                            alice.post("/telemetry", json={"worker_id": "bob", "loss": 1.0}),
                            alice.get("/workers"), join.post("/workers/alice/heartbeat", json={}),
                            join.get("/telemetry")):
                assert refused.status_code == 403, (refused.request.url, refused.text)
            assert "acts only on its own id, not on 'bob'" in alice.delete("/workers/bob").text
            # Re-registering a held id from another identity: 409 naming the id.
            for other in (join, as_bob, admin):
                taken = other.post("/workers/register", json=registration("alice"))
                assert taken.status_code == 409 and "'alice'" in taken.json()["detail"]
            again = alice.post("/workers/register", json=registration("alice", port=7001))
            assert again.status_code == 200 and again.json()["credential"] is None
            # A CSR whose signature does not hold: 422 naming csr, and nothing registered.
            bad = me.csr().replace("A", "B", 1)
            refused = join.post("/workers/register", json=registration("carol", csr=bad))
            assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == [
                "body", "csr"]
            # The admin deletes bob: his credential stops working and the id is free again.
            assert admin.delete("/workers/bob").status_code == 200
            assert as_bob.post("/workers/bob/heartbeat", json={}).status_code == 401
            assert join.post("/workers/register", json=registration("bob")).status_code == 200
            listed = {w["worker_id"] for w in admin.get("/workers").json()}
            assert {"alice", "bob"} <= listed and "carol" not in listed


@pytest.mark.timeout(60)
def test_the_ca_is_pinned_by_its_fingerprint(coordinator, tmp_path):
    url, fingerprint, ca, _ = coordinator
    assert fetch_ca(url, fingerprint.upper()) == ca.read_bytes()
    wrong = ("0" if fingerprint[0] != "0" else "1") + fingerprint[1:]
    with pytest.raises(IdentityError, match=f"has sha256 {fingerprint}, expected {wrong}"):
        fetch_ca(url, wrong)
    with pytest.raises(IdentityError, match="--ca FILE or --ca-fingerprint"):
        open_identity(url, "w0")
    with pytest.raises(IdentityError, match="need an https:// coordinator URL"):
        open_identity(url.replace("https", "http"), "w0", ca_fingerprint=fingerprint)
    me = open_identity(url, "w0", ca_fingerprint=fingerprint, directory=str(tmp_path / "w0"))
    assert me is not None and me.ca_pem == ca.read_bytes()


@pytest.mark.timeout(60)
def test_a_worker_renews_its_certificate_and_a_restart_is_itself(coordinator, tmp_path):
    url, _, ca, _ = coordinator
    me = WorkerIdentity("dave", ca_pem=ca.read_bytes(), directory=tmp_path / "dave")
    with Membership(url, token=JOIN, worker_id="dave", ip_address="127.0.0.1", port=7002,
                    heartbeat_interval=0.5, identity=me) as membership:
        membership.join(1, timeout=20)
        first = me.cert.serial_number
        deadline = time.monotonic() + 3 * LIFETIME
        while me.cert.serial_number == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert me.cert.serial_number != first, "no renewal within three lifetimes"
        assert me.material().epoch >= 2
        membership.leave()
    # The same identity directory again (a restarted worker): registered as itself.
    again = WorkerIdentity("dave", ca_pem=ca.read_bytes(), directory=tmp_path / "dave")
    assert again.credential == me.credential
    with Membership(url, token=JOIN, worker_id="dave", ip_address="127.0.0.1", port=7003,
                    identity=again) as membership:
        membership.join(1, timeout=20)
        membership.leave()
    # Another identity with dave's id: refused, naming the id.
    stranger = WorkerIdentity("dave", ca_pem=ca.read_bytes(), directory=tmp_path / "other")
    with Membership(url, token=JOIN, worker_id="dave", ip_address="127.0.0.1", port=7004,
                    identity=stranger) as membership:
        with pytest.raises(CoordinatorError, match="worker id 'dave' is registered by another"):
            membership.join(1, timeout=20)


@pytest.mark.timeout(30)
def test_your_own_files_are_checked_to_belong_together(tmp_path):
    mine, other = (CertificateAuthority.auto(tmp_path / name, hosts=["127.0.0.1"])
                   for name in ("mine", "other"))
    files = {"cert": mine.server_cert_file, "key": mine.server_key_file, "ca": mine.ca_file,
             "ca_key": tmp_path / "mine" / "ca.key"}
    own = authority_from(Settings(db=":memory:", **{f"tls_{k}": str(v) for k, v in files.items()}))
    assert own.fingerprint == mine.fingerprint
    with pytest.raises(AuthorityError, match="is not signed by --tls-ca"):
        CertificateAuthority.from_files(**{**files, "cert": other.server_cert_file})
    with pytest.raises(AuthorityError, match="CA key does not belong"):
        CertificateAuthority.from_files(**{**files, "ca_key": tmp_path / "other" / "ca.key"})
    with pytest.raises(AuthorityError, match="missing --tls-ca-key"):
        authority_from(Settings(db=":memory:", tls_cert="x", tls_key="y", tls_ca="z"))


@pytest.mark.timeout(60)
def test_a_wrong_or_revoked_worker_credential_is_refused_naming_it(coordinator, tmp_path):
    """Worker credentials do not expire (certificates do, test_tls_identity.py): a made-up
    one, one altered by a character and one revoked are 401 on every worker route, naming
    what was wrong; another worker's valid one is 403 on this id's routes, renewal included."""
    url, _, ca, _ = coordinator
    me = WorkerIdentity("erin", ca_pem=ca.read_bytes(), directory=tmp_path / "erin")
    with http(url, ca, JOIN) as join, http(url, ca, ADMIN) as admin:
        erin = join.post("/workers/register", json=registration("erin", csr=me.csr())).json()
        frank = join.post("/workers/register", json=registration("frank")).json()["credential"]
        real = erin["credential"]
        altered = real[:-1] + ("A" if real[-1] != "A" else "B")
        assert admin.delete("/workers/frank").status_code == 200  # frank's credential revoked
        ghost = join.post("/workers/register", json=registration("ghost")).json()["credential"]
        routes = (("post", "/workers/erin/heartbeat", {}),
                  ("post", "/workers/erin/certificate", {"csr": me.csr()}),
                  ("post", "/telemetry", {"worker_id": "erin", "loss": 1.0}),
                  ("delete", "/workers/erin", None))
        for what, token in (("made up", "x" * 43), ("altered", altered), ("revoked", frank)):
            with http(url, ca, token) as client:
                for method, path, body in routes:
                    kwargs = {} if body is None else {"json": body}
                    answer = getattr(client, method)(path, **kwargs)
                    assert answer.status_code == 401, (what, path, answer.text)
                    assert "not the join token, the admin token or a worker's credential" in (
                        answer.text), (what, path, answer.text)
        with http(url, ca, ghost) as other:
            for method, path, body in routes:
                kwargs = {} if body is None else {"json": body}
                answer = getattr(other, method)(path, **kwargs)
                assert answer.status_code == 403, (path, answer.text)
                assert "'erin'" in answer.text, (path, answer.text)
        with http(url, ca, real) as client:  # the positive control, after all of the above
            assert client.post("/workers/erin/heartbeat", json={}).status_code == 200
            renewed = client.post("/workers/erin/certificate", json={"csr": me.csr()})
            assert renewed.status_code == 200, renewed.text
