"""Mutual TLS on the peer plane with real certificates (a CA made by the coordinator's
authority, worker keys and CSRs made by the workers' identity code) over real gRPC servers on
loopback: collectives work, ring forwarding included; a peer without a client certificate, with
another CA's, or dialling the wrong worker, is refused at the handshake; a certified peer that
claims another rank's sender or origin is refused with PERMISSION_DENIED naming the claimed
rank, its certificate's id and the id expected, and the slot it aimed at completes with the
real contributions only; a certificate signed by the CA but past its end is refused at the
handshake, presented by a client or served by a server."""

from __future__ import annotations

import asyncio
import datetime
import time
from urllib.parse import quote

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from communication import identity as peer_identity
from communication.auth import TlsConfig
from communication.codec import as_bytes
from communication.collectives import Key, Phase
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from communication.mtls import Material, MutualTls
from communication.peer_client import PeerCallError, PeerClient
from communication.proto import zerop2p_pb2 as pb
from coordinator import authority as coordinator_authority
from coordinator.authority import CertificateAuthority
from worker.membership.identity import WorkerIdentity

TOKEN = "tls-test-token"
IDS = ("w0", "w 1/ü:%", "w2", "w3")  # odd characters: the names must survive quoting


def make_ca(path) -> CertificateAuthority:
    return CertificateAuthority.auto(path, hosts=["127.0.0.1"])


def certified(ca: CertificateAuthority, worker_id: str, tmp_path) -> WorkerIdentity:
    """A worker's identity: its own key and CSR, a certificate the CA signed from it."""
    me = WorkerIdentity(worker_id, ca_pem=ca.ca_pem,
                        directory=tmp_path / "ids" / quote(worker_id, safe=""))
    cert = ca.sign_worker(ca.read_csr(me.csr()), worker_id, lifetime=600)
    me.adopt_certificate(coordinator_authority.pem_of(cert))
    return me


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Four certified workers' transports bound to generation 1 (mutual TLS)."""
    tmp = tmp_path_factory.mktemp("tls")
    ca = make_ca(tmp / "ca")
    ids = [certified(ca, w, tmp) for w in IDS]
    transports = [GrpcTransport(token=TOKEN, tls=me.peer_tls()) for me in ids]
    peers = [t.address for t in transports]
    yield ca, ids, transports, peers, tmp
    for t in transports:
        t.close()


def bind(transports, peers, n: int, generation: int) -> list[GrpcCollectives]:
    return [GrpcCollectives.bind(t, rank=r, world_size=n, peers=peers[:n], generation=generation,
                                 timeout=20.0, members=list(IDS[:n]))
            for r, t in enumerate(transports[:n])]


@pytest.mark.timeout(30)
def test_both_sides_spell_a_worker_identity_alike():
    for worker_id in IDS + ("x" * 128,):
        assert (peer_identity.worker_dns_name(worker_id)
                == coordinator_authority.worker_dns_name(worker_id))
        assert coordinator_authority.worker_uri(worker_id).startswith(peer_identity.URI_PREFIX)
    assert peer_identity.DNS_SUFFIX == coordinator_authority.DNS_SUFFIX


@pytest.mark.timeout(60)
def test_collectives_over_mutual_tls_direct_and_ring(cluster):
    _, _, transports, peers, _ = cluster
    colls = bind(transports, peers, 4, generation=1)
    xs = [torch.arange(300_000, dtype=torch.float32) * (r + 1) for r in range(4)]  # > 1 MiB: ring
    gather = Key(generation=1, phase=Phase.GATHER_FORWARD, step=0, unit=0)
    reduce = Key(generation=1, phase=Phase.ALL_REDUCE, step=0, index=0)
    gathered = [c.all_gather(gather, x) for c, x in zip(colls, xs)]
    summed = [c.all_reduce(reduce, x[:10]) for c, x in zip(colls, xs)]
    for g, s in zip(gathered, summed):
        assert torch.equal(g.result(30), torch.cat(xs))
        assert torch.equal(s.result(30), sum(x[:10] for x in xs))


async def _ping(address: str, tls, server_name: str | None) -> PeerCallError | None:
    client = PeerClient(address, token=TOKEN, tls=tls, server_name=server_name)
    try:
        await client.ping(1, 0, timeout=1.5)
        return None
    except PeerCallError as exc:
        return exc
    finally:
        await client.close()


@pytest.mark.timeout(60)
async def test_a_peer_without_the_right_certificate_is_refused_at_the_handshake(cluster):
    ca, ids, transports, peers, tmp = cluster
    w1 = peer_identity.worker_dns_name(IDS[1])
    assert await _ping(peers[1], ids[0].peer_tls(), w1) is None  # the positive control
    uncertified = WorkerIdentity("w0", ca_pem=ca.ca_pem, directory=tmp / "uncertified")
    stranger = certified(make_ca(tmp / "other-ca"), IDS[0], tmp / "stranger").material()
    # another CA's certificate for w0's id, presented by a client that trusts our CA
    foreign = Material(stranger.key_pem, stranger.cert_pem, ca.ca_pem, epoch=1)
    ca_file = tmp / "ca" / "ca.pem"
    attempts = {"no client certificate": (peers[1], TlsConfig(ca_file=str(ca_file))),
                "a self-signed placeholder": (peers[1], uncertified.peer_tls()),
                "another CA's certificate": (peers[1], MutualTls(lambda: foreign)),
                # a client that means w1 but reaches w2's address refuses w2's certificate
                "the wrong worker's server": (peers[2], ids[0].peer_tls())}
    errors = await asyncio.gather(*(_ping(address, tls, w1) for address, tls in attempts.values()))
    for what, err in zip(attempts, errors):
        assert err is not None and err.code == grpc.StatusCode.UNAVAILABLE, what


def _header(key: str, *, sender: int, origin: int, n: int, generation: int) -> pb.TensorHeader:
    return pb.TensorHeader(key=key, generation=generation, sender=sender, origin=origin,
                           dtype="float32", shape=[n], offset=0, total_bytes=4 * n, codec="raw")


@pytest.mark.timeout(60)
async def test_a_certified_peer_cannot_push_as_another_rank(cluster):
    _, ids, transports, peers, _ = cluster
    colls = bind(transports, peers, 3, generation=2)
    key = Key(generation=2, phase=Phase.ALL_REDUCE, step=0, index=0)
    xs = [torch.full((8,), float(r + 1)) for r in range(3)]
    target = colls[2].all_reduce(key, xs[2])  # rank 2 opens the slot and waits for 0 and 1
    acc = transports[2].accumulator
    slot = transports[2].call(acc.slot(str(key), 5.0, generation=2), timeout=6.0)
    attacker = PeerClient(peers[2], token=TOKEN, tls=ids[0].peer_tls(),
                          server_name=peer_identity.worker_dns_name(IDS[2]))
    forged = as_bytes(torch.full((8,), 1000.0))
    deadline = asyncio.get_running_loop().time() + 5.0
    try:
        # w0's certificate claiming rank 1's sender, then rank 0 forwarding rank 1's origin
        # (only rank 2's ring predecessor, rank 1, may forward).
        for sender, origin, words in ((1, 1, ["claimed sender rank 1", repr(IDS[0]),
                                                  f"is {IDS[1]!r}"]),
                                      (0, 1, ["origin rank 1", "only rank 1"])):
            with pytest.raises(PeerCallError) as refused:
                await attacker.push(_header(str(key), sender=sender, origin=origin, n=8,
                                            generation=2), forged, deadline=deadline)
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
            for word in words:
                assert word in str(refused.value), str(refused.value)
            assert not slot.has(1) and transports[2].servicer.receiving() == 0
    finally:
        await attacker.close()
    others = [c.all_reduce(key, x) for c, x in zip(colls[:2], xs[:2])]
    expected = xs[0] + xs[1] + xs[2]
    for fut in (target, *others):
        assert torch.equal(fut.result(20), expected)  # rank 1's real contribution counted


@pytest.mark.timeout(30)
def test_renewal_serves_the_new_certificate_to_new_handshakes(cluster):
    ca, ids, transports, peers, tmp = cluster
    before = ids[3].material().epoch
    cert = ca.sign_worker(ca.read_csr(ids[3].csr()), IDS[3], lifetime=900)
    ids[3].adopt_certificate(coordinator_authority.pem_of(cert))
    assert ids[3].material().epoch == before + 1
    assert ids[3].renew_at() > time.time() + 500
    err = asyncio.run(_ping(peers[3], ids[0].peer_tls(), peer_identity.worker_dns_name(IDS[3])))
    assert err is None


def expired_material(ca_dir, ca_pem: bytes, worker_id: str) -> Material:
    """A certificate for ``worker_id`` signed with the CA key kept in ``ca_dir``, with the
    names of a real one, that ended an hour ago."""
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=2))
            .not_valid_after(now - datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(coordinator_authority.worker_uri(worker_id)),
                x509.DNSName(peer_identity.worker_dns_name(worker_id))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert.verify_directly_issued_by(ca_cert)  # the CA's own signature: only the date is wrong
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Material(key_pem, coordinator_authority.pem_of(cert).encode(), ca_pem, epoch=1)


@pytest.mark.timeout(60)
async def test_an_expired_certificate_signed_by_the_ca_is_refused_at_the_handshake(cluster):
    ca, ids, transports, peers, tmp = cluster
    w1 = peer_identity.worker_dns_name(IDS[1])
    mine, stale = (expired_material(tmp / "ca", ca.ca_pem, w) for w in (IDS[0], "stale"))
    expired = MutualTls(lambda: mine)
    assert await _ping(peers[1], ids[0].peer_tls(), w1) is None  # w0's valid one: let in
    err = await _ping(peers[1], expired, w1)  # the same id, expired: refused by w1's server
    assert err is not None and err.code == grpc.StatusCode.UNAVAILABLE
    # A peer server serving an expired certificate: a valid client refuses it.
    server = GrpcTransport(token=TOKEN, tls=MutualTls(lambda: stale))
    try:
        err = await _ping(server.address, ids[0].peer_tls(), peer_identity.worker_dns_name("stale"))
        assert err is not None and err.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()
