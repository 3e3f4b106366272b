"""A shared Redis as production runs it: TLS (`rediss://`) and an ACL user confined to shoal's keys.

Every store works through both, the multi-MB weight transfers included (they speak RESP on the
pool's own sockets), and what can never succeed by retrying fails at once, saying how to fix it.
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agents.memory import ReplayStream, RunState, WeightStore, connect, list_runs
from orchestrator.runtime.services import RedisServer

pytestmark = pytest.mark.redis


def _self_signed(directory: Path) -> Path:
    """A certificate for 127.0.0.1 that is its own CA; writes ``cert.pem`` and ``key.pem``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "cert.pem"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _password(server: RedisServer) -> str:
    return redis.connection.parse_url(server.url)["password"]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A private server that also listens for TLS; yields it, its TLS port and the CA file."""
    ca = _self_signed(tmp_path_factory.mktemp("tls"))
    port = _free_port()
    tls = {
        "tls-port": str(port),
        "tls-cert-file": str(ca),
        "tls-key-file": str(ca.with_name("key.pem")),
        "tls-ca-cert-file": str(ca),
        "tls-auth-clients": "no",
    }
    with RedisServer(config=tls) as server:
        yield server, port, ca


def _every_store_round_trips(client, run_id: str) -> None:
    weights = {"w": torch.randn(1000, 1000), "b": torch.arange(7, dtype=torch.int64)}
    store = WeightStore(client, run_id)
    store.publish(weights, version=3)
    version, got = store.fetch()
    assert version == 3 and all(torch.equal(got[k], v) for k, v in weights.items())

    replay = ReplayStream(client, run_id, maxlen=10)
    chunk = {"obs": torch.randn(4, 3, 5)}
    replay.append(chunk)
    (sampled,) = replay.sample(1, random.Random(0))
    assert torch.equal(sampled["obs"], chunk["obs"])

    state = RunState(client, run_id)
    state.set_status("running")
    state.request_stop()
    assert state.get()["status"] == "running" and state.stop_requested()
    assert run_id in list_runs(client)


def test_every_store_works_over_tls(tls_server) -> None:
    server, port, ca = tls_server
    client = connect(
        f"rediss://:{_password(server)}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    )
    with client:
        assert client.connection_pool.connection_class.__name__ == "SSLConnection"
        _every_store_round_trips(client, "over-tls")


def test_an_untrusted_certificate_fails_at_once_and_says_how_to_fix_it(tls_server) -> None:
    server, port, _ = tls_server
    client = connect(f"rediss://:{_password(server)}@127.0.0.1:{port}/0", outage_timeout=30)
    t0 = time.monotonic()
    with client, pytest.raises(redis.ConnectionError, match=r"do(es)? not trust.*ssl_ca_certs="):
        client.ping()
    assert time.monotonic() - t0 < 5  # not retried like an outage
    # The password never shows in what the user sees.
    assert _password(server) not in repr(client)


def test_an_acl_user_confined_to_shoal_keys_runs_every_store(private_redis) -> None:
    admin = connect(private_redis.url)
    with admin:
        admin.execute_command("ACL", "SETUSER", "trainer", "on", ">s3cret-pw", "~shoal:*", "+@all")
    port = private_redis.url.rsplit(":", 1)[1].split("/")[0]
    with connect(f"redis://trainer:s3cret-pw@127.0.0.1:{port}/0") as client:
        _every_store_round_trips(client, "as-acl-user")
        # Every key shoal writes is under shoal:*, so that grant is all a run needs.
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("elsewhere", b"x")

    wrong = connect(f"redis://trainer:not-it@127.0.0.1:{port}/0", outage_timeout=30)
    with wrong, pytest.raises(redis.AuthenticationError) as info:
        wrong.ping()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "SHOAL_REDIS_PASSWORD" in message
    assert "not-it" not in message
