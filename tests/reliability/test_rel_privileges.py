"""Started as root, the workers run as exim_user with no capabilities and
NoNewPrivs; spool and logs belong to that user and others cannot read them.

Needs root, the system user `mta` (`make test` creates it) and a Python the
unprivileged workers can read (Debian's: `make test` builds .venv with it;
an interpreter under /root is out of their reach and the test is skipped).
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import sys
import tempfile

import gevent
import pytest

from harness import REPO, MtaServer, base_config, free_port
from reliability_helpers import proc_status, wait_until
from test_smtp_server import send_one

USER = "mta"
DEFERRING = """
queue_run_interval = 1s
begin routers
nowhere:
  driver = manualroute
  route_list = * 127.0.0.1
  transport = closed_port
begin transports
closed_port:
  driver = smtp
  port = 1
"""


def others_can_reach(path: str) -> bool:
    """Every folder on the way is searchable by anyone (o+x)."""
    path = os.path.realpath(path)
    while path != "/":
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        path = os.path.dirname(path)
    return True


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


CODE = [os.path.dirname(os.__file__), os.path.dirname(gevent.__file__), REPO, os.path.realpath(sys.executable)]
pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root"),
    pytest.mark.skipif(not user_exists(USER), reason=f"the system user {USER} is created by `make test`"),
    pytest.mark.skipif(not all(others_can_reach(path) for path in CODE),
                       reason=f"this Python ({sys.base_prefix}) is unreadable after dropping root: "
                              "use the Debian-Python venv that `make test` builds"),
]


@pytest.fixture
def server_as_root():
    directory = tempfile.mkdtemp(prefix="mta-privileges-")  # pytest's own folders are root-only
    os.chmod(directory, 0o755)
    port = free_port()
    server = MtaServer(directory, port, base_config(directory, port, f"exim_user = {USER}\n" + DEFERRING, 1, 1))
    yield server
    server.stop()
    server.kill_all()
    shutil.rmtree(directory)


# The master's own files: root's, readable by exim_user (the metrics worker
# reads the status), kept from others by their 0750 folder.
MASTER_FILES = {"mta-server.pid": {0o644, 0o640}, "run/master.status": {0o644, 0o640}}


def loose_modes(root: str, owner: int) -> list[str]:
    """Everything under root not owned by `owner` (the master's files: by
    root) or open to others: folders must be 0750, files 0600 or 0640."""
    problems = []
    for folder, folders, files in os.walk(root):
        for name, allowed in [(f, {0o750}) for f in folders] + [(f, {0o600, 0o640}) for f in files]:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            expected_owner = 0 if relative in MASTER_FILES else owner
            if info.st_uid != expected_owner or mode not in MASTER_FILES.get(relative, allowed):
                problems.append(f"{relative} uid={info.st_uid} mode={mode:o}")
    return problems


def test_workers_drop_everything_and_files_are_private(server_as_root, report):
    server = server_as_root
    user = pwd.getpwnam(USER)
    server.start()
    reply = send_one(server.port)
    assert reply.startswith("250 OK id=")
    message_id = reply.split("id=")[1]
    assert wait_until(lambda: os.path.exists(os.path.join(server.input, f"{message_id}-R")), 15)
    server.wait_for_log(f"{message_id} == ")

    workers = server.worker_pids("smtp") + server.worker_pids("delivery")
    assert len(workers) == 2
    groups = {str(g.gr_gid) for g in grp.getgrall() if USER in g.gr_mem} | {str(user.pw_gid)}
    for pid in workers:
        status = proc_status(pid)
        assert status["Uid"].split() == [str(user.pw_uid)] * 4
        assert status["Gid"].split() == [str(user.pw_gid)] * 4
        assert set(status["Groups"].split()) <= groups
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 0, f"{capabilities} {status[capabilities]}"
        assert status["NoNewPrivs"] == "1"

    problems = loose_modes(server.spool, user.pw_uid)
    assert problems == [], "\n".join(problems)
    for kind in ("main", "reject", "panic"):
        assert os.path.exists(os.path.join(server.spool, "log", f"{kind}log")), f"{kind}log not created"
    assert f"{message_id} <= a@example.org" in server.log(), "the SMTP worker could not write the main log"
    report("privileges (as root)", f"exim_user = {USER}: 1 SMTP worker, 1 queue runner", len(workers), 0,
           f"uid/gid {USER}, all caps 0 (bounding set too), NoNewPrivs, spool+logs 0750/0600/0640")
