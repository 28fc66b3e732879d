"""The group committer: files written on the hub, one sync per batch in a
thread, every session answered only once its own message is durable."""
from __future__ import annotations

import os
import time

import gevent
import gevent.socket
import pytest

from mta.committer import GroupCommitter
from mta.spool import Envelope, IncomingMessage, Spool


@pytest.fixture
def spool(tmp_path) -> Spool:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_directories()
    return spool


def incoming(spool: Spool, message_id: str, body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> IncomingMessage:
    message = IncomingMessage(spool, message_id)
    message.write(body)
    message.finish(Envelope(id=message_id, sender="a@example.org", recipients=["u@localhost"],
                            received_time=time.time(), size=len(body)))
    return message


def commit_all(committer: GroupCommitter, messages: list[IncomingMessage]) -> list[BaseException | None]:
    """Commit from one greenlet per message, as concurrent sessions do."""
    def one(message: IncomingMessage) -> BaseException | None:
        try:
            committer.commit(message)
        except OSError as exc:
            return exc
        return None

    greenlets = [gevent.spawn(one, message) for message in messages]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    return [greenlet.value for greenlet in greenlets]


@pytest.mark.parametrize("method", ["syncfs", "fsync"])
def test_concurrent_messages_share_batches_and_are_all_stored(spool, method):
    committer = GroupCommitter(spool, method)
    try:
        messages = [incoming(spool, f"1abcde-00000000000{index:02d}-AA") for index in range(12)]
        assert commit_all(committer, messages) == [None] * 12
        assert committer.messages == 12
        assert committer.batches < 12  # sessions finishing together shared a sync
    finally:
        committer.close()
    assert spool.message_ids() == sorted(message.id for message in messages)
    for message_id in spool.message_ids():
        spool.check_data(spool.read_envelope(message_id))
    assert list(spool.orphans()) == []
    assert not [name for name in os.listdir(spool.input) if name.endswith("-T")]


def test_a_message_that_cannot_be_written_fails_alone(spool):
    committer = GroupCommitter(spool)
    blocked = "1abcde-0000000000099-AA"
    os.mkdir(spool.path(blocked, "D"))  # its data file cannot be opened for writing
    try:
        messages = [incoming(spool, "1abcde-0000000000001-AA"), incoming(spool, blocked),
                    incoming(spool, "1abcde-0000000000002-AA")]
        results = commit_all(committer, messages)
    finally:
        committer.close()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError)
    assert spool.message_ids() == ["1abcde-0000000000001-AA", "1abcde-0000000000002-AA"]
    assert not os.path.exists(spool.path(blocked, "T")) and not os.path.exists(spool.path(blocked, "H"))


def test_a_lone_connection_commits_inline(spool):
    committer = GroupCommitter(spool, alone=lambda: True)
    try:
        committer.commit(incoming(spool, "1abcde-0000000000003-AA"))
    finally:
        committer.close()
    assert spool.message_ids() == ["1abcde-0000000000003-AA"]
    assert committer.batches == 1


def test_sessions_that_become_ready_while_the_hub_is_busy_share_one_batch(spool):
    """Each session's final data arrives while the previous one is being
    served, one hub iteration apart: the first must not sync alone (the
    committer waits for the hub's idle point before it takes a batch)."""
    committer = GroupCommitter(spool)
    pairs = [gevent.socket.socketpair() for _ in range(5)]
    messages = [incoming(spool, f"1abcde-00000000001{index:02d}-AA") for index in range(5)]
    clients = [client for _, client in pairs]

    def session(index: int) -> None:
        assert pairs[index][0].recv(16) == b".\r\n"
        if index + 1 < len(pairs):
            clients[index + 1].send(b".\r\n")  # ready at the hub's next poll
        committer.commit(messages[index])

    try:
        greenlets = [gevent.spawn(session, index) for index in range(len(pairs))]
        gevent.sleep(0.05)  # every session now waits in recv
        clients[0].send(b".\r\n")
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        assert committer.messages == 5
        assert committer.batches == 1
    finally:
        committer.close()
        for server, client in pairs:
            server.close()
            client.close()
