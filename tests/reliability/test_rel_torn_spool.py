"""Torn and truncated spool files, as a crash leaves them.

Each is reported in the panic log and set aside in spool/corrupt; the queue
runner never crashes and delivers every sound message around them.  With
`spool_sync = syncfs` a crash can leave an envelope whose recorded size
exceeds a short -D file: the runner compares and sets the message aside.
"""
from __future__ import annotations

import os
import time

import msgpack

from mta.message_id import MessageIdSource
from mta.spool import Envelope
from reliability_helpers import LOCAL_DELIVERY, maildir_deliveries, wait_for_empty_queue, wait_until
from test_smtp_server import send_one

SOUND_MESSAGES = 20
IDS = MessageIdSource(os.getpid())


def message_files(recipient: str) -> tuple[str, bytes, bytes]:
    message_id = IDS.next_id()
    data = (f"Received: from test by mta.test with esmtp\r\n\tid {message_id};\r\n"
            f"Subject: spooled by the test\r\n\r\nbody\r\n").encode()
    envelope = Envelope(id=message_id, sender="a@example.org", recipients=[recipient],
                        received_time=time.time(), size=len(data), host_address="127.0.0.1")
    return message_id, data, envelope.pack()


def bad_envelope(envelope: bytes) -> bytes:
    fields = msgpack.unpackb(envelope)
    fields["recipients"] = 5
    return msgpack.packb(fields)


# name -> how a sound (data, envelope) pair is damaged; None means "no file"
DAMAGE = {
    "short data (syncfs crash window)": lambda data, envelope: (data[: len(data) // 2], envelope),
    "empty data": lambda data, envelope: (b"", envelope),
    "data longer than recorded": lambda data, envelope: (data + b"junk\r\n", envelope),
    "missing data": lambda data, envelope: (None, envelope),
    "torn envelope": lambda data, envelope: (data, envelope[: len(envelope) // 2]),
    "empty envelope": lambda data, envelope: (data, b""),
    "garbage envelope": lambda data, envelope: (data, os.urandom(200)),
    "envelope of wrong types": lambda data, envelope: (data, bad_envelope(envelope)),
}

# damage that costs nothing: the message is still delivered
HARMLESS = {
    "torn journal line": ("J", b"delivered nobody@localhost\ndeliv"),
    "garbage retry state": ("R", os.urandom(64)),
    "retry state of wrong shape": ("R", msgpack.packb({"recipients": [1, 2]})),
}


def write(path: str, content: bytes | None) -> None:
    if content is None:
        return
    with open(path, "wb") as handle:
        handle.write(content)


def plant(input_dir: str) -> tuple[dict[str, str], set[str]]:
    """Write damaged and sound messages into the spool; returns
    (damaged id -> what was done, ids that must be delivered)."""
    os.makedirs(input_dir, exist_ok=True)
    damaged, deliverable = {}, set()
    for index, (name, damage) in enumerate(DAMAGE.items()):
        message_id, data, envelope = message_files(f"damaged{index}@localhost")
        data, envelope = damage(data, envelope)
        write(os.path.join(input_dir, f"{message_id}-D"), data)
        write(os.path.join(input_dir, f"{message_id}-H"), envelope)
        damaged[message_id] = name
    for suffix, content in HARMLESS.values():
        message_id, data, envelope = message_files("harmless@localhost")
        write(os.path.join(input_dir, f"{message_id}-{suffix}"), content)
        write(os.path.join(input_dir, f"{message_id}-D"), data)
        write(os.path.join(input_dir, f"{message_id}-H"), envelope)
        deliverable.add(message_id)
    for _ in range(SOUND_MESSAGES):
        message_id, data, envelope = message_files("sound@localhost")
        write(os.path.join(input_dir, f"{message_id}-D"), data)
        write(os.path.join(input_dir, f"{message_id}-H"), envelope)
        deliverable.add(message_id)
    return damaged, deliverable


def test_torn_spool_files_are_set_aside_and_never_block(mta, tmp_path, report):
    directory = tmp_path / "mta0"
    damaged, deliverable = plant(str(directory / "spool" / "input"))
    server = mta(LOCAL_DELIVERY, workers=1, runners=1)
    runner = wait_until(lambda: server.worker_pids("delivery"), 10)[0]
    assert wait_for_empty_queue(server, timeout=30), f"left in the spool: {server.spooled_ids()}"

    delivered = {message_id for message_id, _ in maildir_deliveries(str(directory / "mail"))}
    assert deliverable <= delivered
    assert not set(damaged) & delivered
    corrupt = os.listdir(directory / "spool" / "corrupt")
    panic = server.log("panic")
    for message_id, name in damaged.items():
        assert f"{message_id}-H" in corrupt, f"{name}: not set aside"
        assert message_id in panic, f"{name}: not reported in the panic log"
    assert "crashed" not in panic and "Traceback" not in panic
    assert server.worker_pids("delivery") == [runner], "the queue runner was replaced"

    reply = send_one(server.port, rcpts=("after@localhost",))
    assert reply.startswith("250 OK id=")
    assert wait_for_empty_queue(server, timeout=15)
    report("torn/truncated spool files", f"{len(DAMAGE)} kinds of damage + {len(HARMLESS)} harmless, "
           f"{SOUND_MESSAGES} sound", len(DAMAGE) + len(HARMLESS) + SOUND_MESSAGES, 0,
           f"{len(damaged)} set aside, runner never restarted")
