"""`mta-server ratelimit-dump` shows the shared table the workers wrote."""
import re

from harness import CHAPTER_CONNECT_ACL
from test_smtp_server import Client

CONNECT_ACL = """
acl_smtp_connect = acl_check_connect
LIMIT = 5
begin acl
""" + CHAPTER_CONNECT_ACL


def test_dump_lists_the_records_written_by_the_workers(mta):
    server = mta(CONNECT_ACL, workers=2)
    for _ in range(3):
        client = Client(server.port, source="127.0.0.2")
        assert client.reply().startswith("220")
        client.command("QUIT")
    dump = server.cli("ratelimit-dump")
    assert dump.returncode == 0, dump.stderr
    line = next(line for line in dump.stdout.splitlines() if line.endswith("key: 5s/per_conn/127.0.0.2"))
    rate = float(re.search(r"rate:\s+([\d.]+)", line).group(1))
    assert 1.0 <= rate <= 3.0
    status = server.cli("status")
    assert re.search(r"ratelimit table: [1-9]\d* of \d+ records used", status.stdout), status.stdout
