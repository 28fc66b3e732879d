"""Accepting in turns on an inherited listener (workers/acceptor.py)."""
from __future__ import annotations

import socket

import gevent
import gevent.socket

from workers.acceptor import Acceptor


class RecordingLogs:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def main(self, text: str) -> None:
        self.lines.append(text)


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def connect_to(listener: socket.socket) -> gevent.socket.socket:
    return gevent.socket.create_connection(listener.getsockname(), timeout=5)


def test_accept_returns_each_connection_with_its_peer():
    listener = listening_socket()
    acceptor = Acceptor(listener, tls_on_connect=True, logs=RecordingLogs())
    clients = [connect_to(listener) for _ in range(3)]
    for client in clients:
        accepted = acceptor.accept()
        assert accepted is not None
        sock, peer = accepted
        assert peer == client.getsockname()
        sock.sendall(b"hello")
        assert client.recv(5) == b"hello"
        sock.close()
    assert acceptor.tls_on_connect
    acceptor.close()
    listener.close()
    for client in clients:
        client.close()


def test_close_ends_a_wait_in_accept_without_logging_a_failure():
    listener = listening_socket()
    logs = RecordingLogs()
    acceptor = Acceptor(listener, tls_on_connect=False, logs=logs)
    waiter = gevent.spawn(acceptor.accept)
    gevent.sleep(0.01)
    assert not waiter.ready()
    acceptor.close()
    assert waiter.get(timeout=2) is None
    assert logs.lines == []
    assert acceptor.accept() is None
    listener.close()


def test_the_listener_itself_stays_open_for_the_other_workers():
    """Each worker accepts on its own duplicate of the master's socket."""
    listener = listening_socket()
    acceptor = Acceptor(listener, tls_on_connect=False, logs=RecordingLogs())
    acceptor.close()
    client = connect_to(listener)
    listener.setblocking(True)
    sock, _ = listener.accept()
    sock.close()
    client.close()
    listener.close()
