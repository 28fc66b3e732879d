import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import MtaServer, base_config, free_port  # noqa: E402


@pytest.fixture
def mta(tmp_path):
    """A factory: mta(extra_config, workers=2, runners=0) -> a started server."""
    servers = []

    def start(extra: str = "", workers: int = 2, runners: int = 0, port: int | None = None) -> MtaServer:
        port = port or free_port()
        directory = str(tmp_path / f"mta{len(servers)}")
        os.makedirs(directory, exist_ok=True)
        server = MtaServer(directory, port, base_config(directory, port, extra, workers, runners))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
        server.kill_all()
