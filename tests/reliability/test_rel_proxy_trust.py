"""A PROXY header is believed only at the start of a connection from a
`hosts_proxy` host, within `proxy_protocol_timeout`, and only the first one.
An address from a header that was not believed never shows up: not in
$sender_host_address, not in Received:, not in any log line (main, reject,
panic, with every log_selector item on), not in the spool."""
from __future__ import annotations

import os
import re
import time

from mta.proxy_protocol import build_v1, build_v2
from test_smtp_server import MESSAGE, Client

TRUSTED, UNTRUSTED = "127.0.0.1", "127.0.0.2"
REAL_CLIENT = "198.51.100.50"
PROXY_TIMEOUT = 1.0
CONFIG = f"""hosts_proxy = {TRUSTED}
proxy_protocol_timeout = {PROXY_TIMEOUT:g}s
log_selector = +all
smtp_max_synprot_errors = 20
smtp_banner = $primary_hostname ESMTP h=$sender_host_address
"""


def v1(address: str) -> bytes:
    return build_v1("TCP4", address, "192.0.2.1", 4321, 25)


def v2(address: str) -> bytes:
    return build_v2("PROXY", "INET", address, "192.0.2.1", 4321, 25)


def believed(client: Client) -> str:
    return re.search(r"h=(\S+)", client.reply()).group(1)


def deliver(client: Client) -> str:
    """A whole message on this connection; returns the reply to the data."""
    assert client.command("EHLO c.example").startswith("250")
    assert client.command("MAIL FROM:<a@example.org>").startswith("250")
    assert client.command("RCPT TO:<u@localhost>").startswith("250")
    assert client.command("DATA").startswith("354")
    return client.command(MESSAGE + ".")


def read_until_closed(client: Client) -> bytes:
    client.sock.settimeout(10)
    received = client.buffer
    while True:
        chunk = client.sock.recv(4096)
        if not chunk:
            return received
        received += chunk


def untrusted_v1_first(port: int, forged: str) -> None:
    client = Client(port, source=UNTRUSTED)
    client.send(v1(forged))
    assert believed(client) == UNTRUSTED
    assert client.reply().startswith("500")
    assert deliver(client).startswith("250")


def untrusted_v2_first(port: int, forged: str) -> None:
    """v2's signature holds CR LF NUL "QUIT" LF: read as SMTP it ends the session."""
    client = Client(port, source=UNTRUSTED)
    client.send(v2(forged))
    assert believed(client) == UNTRUSTED
    assert b"221 " in read_until_closed(client)


def untrusted_mid_session(port: int, forged: str) -> None:
    client = Client(port, source=UNTRUSTED)
    assert believed(client) == UNTRUSTED
    assert client.command("EHLO c.example").startswith("250")
    assert client.command(v1(forged).decode().rstrip()).startswith("500")
    assert deliver(client).startswith("250")


def trusted_second_v1(port: int, forged: str) -> None:
    client = Client(port, source=TRUSTED)
    client.send(v1(REAL_CLIENT) + v1(forged))
    assert believed(client) == REAL_CLIENT
    assert client.reply().startswith("500")
    assert deliver(client).startswith("250")


def trusted_second_v2(port: int, forged: str) -> None:
    client = Client(port, source=TRUSTED)
    client.send(v1(REAL_CLIENT) + v2(forged))
    assert believed(client) == REAL_CLIENT
    assert b"221 " in read_until_closed(client)


def trusted_too_late(port: int, forged: str) -> None:
    client = Client(port, source=TRUSTED)
    time.sleep(PROXY_TIMEOUT + 0.3)
    assert believed(client) == TRUSTED
    assert client.command(v1(forged).decode().rstrip()).startswith("503")
    assert client.command("EHLO c.example").startswith("503")


SCENARIOS = [untrusted_v1_first, untrusted_v2_first, untrusted_mid_session, trusted_second_v1,
             trusted_second_v2, trusted_too_late]


def everything_written(server) -> str:
    """Every log file and every spool file, as text."""
    texts = []
    for folder in (os.path.join(server.spool, "log"), server.input):
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as handle:
                texts.append(handle.read().decode("utf-8", "replace"))
    return "\n".join(texts)


def test_forged_headers_are_never_believed_nor_logged(mta, report):
    server = mta(CONFIG, workers=2)
    forged = {scenario.__name__: f"203.0.113.{index + 1}" for index, scenario in enumerate(SCENARIOS)}
    for scenario in SCENARIOS:
        scenario(server.port, forged[scenario.__name__])
    server.wait_for_log(f"H=(c.example) [{REAL_CLIENT}]")
    time.sleep(0.3)  # the last connections' closing lines
    written = everything_written(server)
    leaked = [name for name, address in forged.items() if address in written]
    assert leaked == [], f"forged addresses written by: {leaked}"
    assert f"Received: from [{UNTRUSTED}]" in written and f"Received: from [{REAL_CLIENT}]" in written
    report("forged PROXY headers", "untrusted v1/v2/mid-session, 2nd v1/v2, too late", len(SCENARIOS),
           len(leaked), "never believed; absent from all logs (+all) and spool")
