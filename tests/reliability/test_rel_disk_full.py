"""The spool's disk fills up while messages arrive.

spool/input is a 2 MiB tmpfs (the logs are elsewhere).  DATA is answered
452 (temporary), both when the message fails at commit and when a large one
fails while it is being spilled to disk; nothing half-written stays in the
spool; the session goes on; once there is space again messages are accepted.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from mta.spool import Spool
from test_smtp_server import Client

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")

TMPFS_SIZE = "2m"
FILLER = 1200 * 1024


@pytest.fixture
def small_spool(tmp_path):
    """tmp_path/mta0/spool/input on a small tmpfs; unmounted at teardown."""
    mount_point = tmp_path / "mta0" / "spool" / "input"
    mount_point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0750", "tmpfs", str(mount_point)],
                   check=True)
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def message_of(size: int) -> str:
    line = "x" * 998 + "\r\n"
    return "Subject: filling the disk\r\n\r\n" + line * (size // len(line)) + "."


class Session:
    def __init__(self, port: int) -> None:
        self.client = Client(port)
        assert self.client.reply().startswith("220")
        assert self.client.command("EHLO c.example").startswith("250")

    def send(self, size: int) -> str:
        assert self.client.command("MAIL FROM:<a@example.org>").startswith("250")
        assert self.client.command("RCPT TO:<u@localhost>").startswith("250")
        assert self.client.command("DATA").startswith("354")
        return self.client.command(message_of(size))


def spool_is_consistent(spool_directory: str) -> list[str]:
    """Problems: files without an envelope, envelopes whose data is not all there."""
    spool = Spool(spool_directory)
    problems = [f"half-written: {path}" for path in spool.orphans()]
    for message_id in spool.message_ids():
        envelope = spool.read_envelope(message_id)
        if spool.data_size(message_id) != envelope.size:
            problems.append(f"{message_id}: data shorter than its envelope says")
    return problems


def test_disk_full_gets_452_and_leaves_nothing_half_written(mta, small_spool, report):
    server = mta("message_size_limit = 10M", workers=1)
    filler = os.path.join(small_spool, "filler")
    with open(filler, "wb") as handle:
        handle.write(b"\0" * FILLER)
    bystander = Client(server.port)  # a second connection: commits go through the committer's thread
    assert bystander.reply().startswith("220")
    session = Session(server.port)

    spilled = session.send(1500 * 1024)        # fails while spilling to disk, mid-DATA
    assert spilled.startswith("452"), spilled
    assert sorted(os.listdir(small_spool)) == ["filler"]
    assert session.client.command("NOOP").startswith("250")

    acked, replies = [], []
    for _ in range(20):                        # fails when the batch is committed
        reply = session.send(150 * 1024)
        replies.append(reply)
        if reply.startswith("250 OK id="):
            acked.append(reply.split("id=")[1])
        else:
            break
    assert replies[-1].startswith("452"), replies[-1]
    assert spool_is_consistent(server.spool) == []
    assert session.client.command("RSET").startswith("250")

    os.unlink(filler)                           # space returns
    again = session.send(150 * 1024)
    assert again.startswith("250 OK id="), again
    acked.append(again.split("id=")[1])
    session.client.command("QUIT")
    assert set(acked) <= set(server.spooled_ids())
    assert spool_is_consistent(server.spool) == []
    assert "spool disk full" in server.log()
    report("spool disk full (2 MiB tmpfs)", "1.5 MiB spill + 150 KiB msgs until full, then free space",
           len(replies) + 2, 0, f"{len(acked)} acked all spooled; 452 at spill and at commit")
