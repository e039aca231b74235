"""Two workers train over mutual TLS (the coordinator their CA, HTTPS to it, certificates from
CSRs) and end with the plain run's weights, bit for bit."""

from __future__ import annotations

import pytest
from cryptography import x509
from run_helpers import assert_same_weights, result

from worker.cluster.launcher import run_local_cluster

ARGS = ["--model", "tiny-gpt2", "--steps", "3", "--micro-batch-rows", "4", "--seq-len", "32",
        "--max-tokens", "20000", "--schedule", "constant", "--lr", "3e-3"]


@pytest.mark.timeout(150)
def test_two_workers_over_mutual_tls_match_the_plain_run_bit_for_bit(tmp_path):
    plain, secure, tls = tmp_path / "plain", tmp_path / "tls", tmp_path / "ca"
    plain_workers = run_local_cluster(2, ARGS + ["--output", str(plain)], echo=False, timeout=70)
    tls_workers = run_local_cluster(2, ARGS + ["--output", str(secure)], echo=False, timeout=70,
                                    tls_dir=str(tls))
    (res, weights), (ref, ref_weights) = result(secure), result(plain)
    assert res["losses"] == ref["losses"]
    assert_same_weights(weights, ref_weights)
    for worker in tls_workers:  # it was TLS: the peer servers served the signed certificates
        assert any("peer server listening" in line and "(TLS)" in line for line in worker.lines)
        assert any("serving certificate epoch 1" in line for line in worker.lines), worker.lines
    for worker in plain_workers:
        assert not any("(TLS)" in line for line in worker.lines)
    cert = x509.load_pem_x509_certificate((tls / "w0" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:zerop2p:worker:w0"]
