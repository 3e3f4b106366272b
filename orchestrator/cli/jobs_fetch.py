"""``shoal jobs fetch`` for a job that ran without ``run.storage``: from its driver's node.

Such a job wrote its run inside Ray's copy of its working dir on the node that ran its
driver. While the cluster still keeps that copy, a short helper job is placed on the same
node (``entrypoint_resources={"node:<ip>": ...}``) with the same ``working_dir`` package,
so it starts in the same directory; it packs the run into a tar stream printed base64 in its
log, which the Jobs API hands back. Only the newest complete checkpoint (with ``best`` and the
world model's) travels, beside every other file. The helper job is deleted afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shlex
import tarfile
import uuid
from pathlib import Path

from orchestrator.cli.jobs_client import JobsError, ShoalJobs

PREFIX, END, MISSING = "SHOAL-PACK ", "SHOAL-PACK-END ", "SHOAL-PACK-MISSING"

# Runs on the driver's node with the standard library alone (no shoal import needed there).
PACK_SCRIPT = f"""
import base64, hashlib, io, os, sys, tarfile
root = sys.argv[1]
if not os.path.isdir(root):
    print({MISSING!r} + " " + os.path.abspath(root), flush=True)
    sys.exit(3)
ck = os.path.join(root, "checkpoints")
steps = sorted(d for d in (os.listdir(ck) if os.path.isdir(ck) else [])
               if d.startswith("step-") and os.path.isfile(os.path.join(ck, d, "meta.json")))
keep = set(steps[-1:]) | {{"best", "world_model"}}
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as tar:
    for here, dirs, files in os.walk(root):
        rel = os.path.relpath(here, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts[:1] == ["checkpoints"] and len(parts) >= 2 and parts[1] not in keep:
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(files):
            if not name.startswith("."):
                tar.add(os.path.join(here, name), os.path.join(*parts, name))
data = buf.getvalue()
text = base64.b64encode(data).decode()
out = sys.stdout
for i in range(0, len(text), 4096):
    out.write({PREFIX!r} + text[i:i + 4096] + "\\n")
out.write({END!r} + hashlib.sha256(data).hexdigest() + " " + str(len(data)) + "\\n")
out.flush()
"""


def fetch_from_driver(
    jobs: ShoalJobs, job_id: str, run_dir: str, dest: Path, timeout_s: float = 600.0
) -> None:
    """Copy ``run_dir`` (relative to the job's working dir, or absolute) from the job's node.

    Raises:
        JobsError: the job never started, the cluster no longer keeps its working dir or
            its run, or the copy came back damaged (one line, exit code 2 or 1).
    """
    info = jobs.info(job_id)
    ip = info.driver_info.node_ip_address if info.driver_info else None
    package = (info.runtime_env or {}).get("working_dir")
    if not ip or not package:
        raise JobsError(
            f"{job_id} has no driver node or working dir on record (it never started); "
            "nothing to fetch",
            exit_code=2,
        )
    helper = f"{job_id}-fetch-{uuid.uuid4().hex[:6]}"
    entrypoint = shlex.join(["python", "-c", PACK_SCRIPT, run_dir])
    jobs.submit(
        entrypoint=entrypoint,
        submission_id=helper,
        runtime_env={"working_dir": package},
        entrypoint_resources={f"node:{ip}": 0.001},
        metadata={"shoal_fetch": job_id},
    )
    try:
        status = jobs.wait(helper, timeout=timeout_s)
        logs = jobs.logs(helper)
    finally:
        jobs.wait(helper, timeout=30)
        try:
            jobs.delete(helper)
        except JobsError:
            pass  # still running after the timeout: left for the cluster to end
    _unpack(job_id, run_dir, status, logs, dest)


def _unpack(job_id: str, run_dir: str, status: str, logs: str, dest: Path) -> None:
    missing = [line for line in logs.splitlines() if line.startswith(MISSING)]
    if missing:
        where = missing[0][len(MISSING) :].strip() or run_dir
        raise JobsError(
            f"{job_id}'s run ({where}) is no longer on its driver's node; submit with "
            "run.storage=s3://BUCKET/PREFIX (or a path every node mounts) to keep runs",
            exit_code=2,
        )
    chunks, end = [], None
    for line in logs.splitlines():
        if line.startswith(PREFIX):
            chunks.append(line[len(PREFIX) :])
        elif line.startswith(END):
            end = line[len(END) :].split()
    if status != "SUCCEEDED" or end is None:
        tail = logs.strip().splitlines()[-1:] or [status]
        raise JobsError(
            f"cannot copy {job_id}'s run from its driver's node (the helper job "
            f"{status.lower()}: {tail[0][:200]}); the cluster may no longer keep its working dir",
            exit_code=1,
        )
    try:
        data = base64.b64decode("".join(chunks), validate=True)
    except ValueError:  # binascii.Error: a line lost or changed in the log
        data = b""
    if hashlib.sha256(data).hexdigest() != end[0] or len(data) != int(end[1]):
        raise JobsError(f"{job_id}'s run came back damaged; fetch it again", exit_code=1)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, no links out of dest
