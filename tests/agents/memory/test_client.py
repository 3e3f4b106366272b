"""The resilient client: URLs and passwords, restarts ridden out, lasting outages reported."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
import redis

from agents import memory
from agents.memory import RedisUnavailable, WeightStore, connect
from tests.agents.memory.helpers import redis_test, run_id, state_dict


def test_rediss_url_selects_tls_and_connects_lazily(monkeypatch) -> None:
    monkeypatch.setenv(memory.PASSWORD_ENV, "from-env")
    with connect("rediss://redis.example:6380/2", outage_timeout=1) as c:
        pool = c.client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        assert pool.connection_kwargs["password"] == "from-env"
        assert c.address == "redis.example:6380" and "from-env" not in repr(c)


@redis_test
def test_password_from_url_argument_or_environment(redis_server, monkeypatch) -> None:
    host_url = f"redis://{redis_server.address}/0"
    wrong_url = f"redis://:wrong@{redis_server.address}/0"
    monkeypatch.delenv(memory.PASSWORD_ENV, raising=False)
    with connect(redis_server.url) as c:
        assert c.ping()
    with connect(wrong_url, password=redis_server.password) as c:
        assert c.ping()
    monkeypatch.setenv(memory.PASSWORD_ENV, redis_server.password)
    with connect(host_url) as c:
        assert c.ping()
    monkeypatch.delenv(memory.PASSWORD_ENV)
    started = time.monotonic()
    with connect(host_url, outage_timeout=10) as c, pytest.raises(redis.AuthenticationError):
        c.ping()
    assert time.monotonic() - started < 2  # a wrong password is not an outage to wait out


@redis_test
def test_client_survives_restart_and_fires_on_reconnect(private_redis, caplog) -> None:
    run = run_id()
    calls: list[int] = []
    client = connect(private_redis.url, outage_timeout=10)
    store = WeightStore(client, run)

    def republish() -> None:
        calls.append(1)
        store.publish(state_dict(9), 9)

    client.on_reconnect = republish
    store.publish(state_dict(9), 9)
    assert calls == []

    # 1: the server restarts between two calls; the pool reconnects without an error.
    private_redis.restart()
    assert client.ping()
    assert calls == [1] and store.latest_version() == 9

    # 2: the server is down while a call is in flight; the call waits for it to return.
    caplog.set_level(logging.WARNING, logger="agents.memory")
    private_redis.stop()
    timer = threading.Timer(0.4, private_redis.start)
    timer.start()
    try:
        # Served by the fresh, empty server; the hook republishes right after.
        assert store.latest_version() is None
    finally:
        timer.join(timeout=10)
    assert calls == [1, 1] and store.latest_version() == 9
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert all(private_redis.password not in r.getMessage() for r in caplog.records)
    client.close()


@redis_test
def test_lasting_outage_raises_naming_address_not_password(private_redis, caplog) -> None:
    client = connect(private_redis.url, outage_timeout=1.0)
    assert client.ping()
    private_redis.stop()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as excinfo:
        client.get("anything")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4.0
    message = str(excinfo.value)
    assert f"127.0.0.1:{private_redis.port}" in message
    lasted = re.search(r"unreachable for (\d+\.\d) s", message)
    assert lasted is not None and 0.9 <= float(lasted.group(1)) <= elapsed + 0.1
    assert private_redis.password not in message
    assert private_redis.password not in repr(excinfo.getrepr())
    assert all(private_redis.password not in r.getMessage() for r in caplog.records)
    client.close()
