"""Process management: titles, privileges, death with the master, back-off."""
import os
import pwd
import signal
import time

import pytest

from test_operations import wait_for


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\x00", b" ").decode().strip()


def wait_for_titles(server, expected: list[str]) -> list[str]:
    deadline = time.time() + 10
    while True:
        titles = sorted(cmdline(pid) for pid in server.worker_pids("smtp") if os.path.exists(f"/proc/{pid}"))
        if titles == expected or time.time() > deadline:
            return titles
        time.sleep(0.1)


def test_worker_titles_and_generation(mta):
    server = mta(workers=2, runners=1)
    first = ["mta-server: smtp worker 1 gen 1", "mta-server: smtp worker 2 gen 1"]
    assert wait_for_titles(server, first) == first
    server.signal_master(signal.SIGHUP)
    server.wait_for_log("generation 2")
    second = ["mta-server: smtp worker 1 gen 2", "mta-server: smtp worker 2 gen 2"]
    assert wait_for_titles(server, second) == second


def test_workers_die_with_the_master(mta):
    server = mta(workers=2, runners=1)
    workers = server.worker_pids("smtp") + server.worker_pids("delivery")
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    deadline = time.time() + 5
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.05)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and proc_status(pid)["State"][0] != "Z"]
    assert alive == []


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_workers_run_as_exim_user_without_capabilities(mta):
    user = pwd.getpwnam("mta") if "mta" in [p.pw_name for p in pwd.getpwall()] else None
    if user is None:
        pytest.skip("the system user mta is created by `make test`")
    import shutil
    import tempfile
    from harness import MtaServer, base_config, free_port
    directory = tempfile.mkdtemp(prefix="mta-privileges-")  # pytest's own folders are root-only
    os.chmod(directory, 0o755)
    port = free_port()
    server = MtaServer(directory, port, base_config(directory, port, "exim_user = mta", 1, 1))
    try:
        server.start()
        check_dropped(server, user)
    finally:
        server.stop()
        shutil.rmtree(directory)


def check_dropped(server, user) -> None:
    for pid in server.worker_pids("smtp") + server.worker_pids("delivery"):
        status = proc_status(pid)
        assert status["Uid"].split()[:2] == [str(user.pw_uid)] * 2
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"] == "1"
    input_dir = os.stat(server.input)
    assert input_dir.st_uid == user.pw_uid and input_dir.st_mode & 0o007 == 0


def test_master_stops_when_workers_cannot_start(mta, tmp_path):
    from harness import MtaServer, base_config, free_port
    port = free_port()
    directory = str(tmp_path / "bad")
    os.makedirs(directory)
    # A certificate file that exists at check time but is not a certificate: workers fail at boot.
    (tmp_path / "cert.pem").write_text("not a certificate")
    server = MtaServer(directory, port, base_config(
        directory, port, f"tls_certificate = {tmp_path}/cert.pem\ntls_privatekey = {tmp_path}/cert.pem"))
    server.start(wait=False)
    assert server.process.wait(timeout=30) == 3
    assert "could not start" in server.log("panic")
    output = server.process.stdout.read().decode()
    assert "stopped with status 3" in output and "cannot load tls_certificate" in output


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_local_delivery_works_after_dropping_root(tmp_path):
    """The mailbox root is created for exim_user by the master (the workers
    could not create it under a root-owned folder)."""
    import shutil
    import tempfile
    from harness import LOCAL_DELIVERY, MtaServer, base_config, free_port
    from test_smtp_server import send_one
    if "mta" not in [p.pw_name for p in pwd.getpwall()]:
        pytest.skip("the system user mta is created by `make test`")
    directory = tempfile.mkdtemp(prefix="mta-mailbox-")
    os.chmod(directory, 0o755)
    port = free_port()
    delivery = "exim_user = mta\n" + LOCAL_DELIVERY  # mail/ is under the config's folder
    server = MtaServer(directory, port, base_config(directory, port, delivery, 1, 1))
    try:
        server.start()
        assert send_one(server.port).startswith("250")
        server.wait_for_log("Completed")
        delivered = os.listdir(os.path.join(directory, "mail", "user", "new"))
        assert len(delivered) == 1
        assert os.stat(os.path.join(directory, "mail", "user", "new", delivered[0])).st_uid == pwd.getpwnam("mta").pw_uid
    finally:
        server.stop()
        shutil.rmtree(directory)


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_logs_rotated_away_are_recreated_for_exim_user_on_reload(tmp_path):
    """logrotate renames mainlog, then `mta-server reload`: the new mainlog
    belongs to exim_user, and the new workers' lines reach it."""
    import shutil
    import tempfile
    from harness import MtaServer, base_config, free_port
    from test_operations import reload_and_settle
    from test_smtp_server import send_one
    if "mta" not in [p.pw_name for p in pwd.getpwall()]:
        pytest.skip("the system user mta is created by `make test`")
    directory = tempfile.mkdtemp(prefix="mta-rotate-")
    os.chmod(directory, 0o755)
    port = free_port()
    server = MtaServer(directory, port, base_config(directory, port, "exim_user = mta", 1, 0))
    try:
        server.start()
        main_log = os.path.join(server.spool, "log", "mainlog")
        os.rename(main_log, main_log + ".1")
        reload_and_settle(server, 2)
        assert os.stat(main_log).st_uid == pwd.getpwnam("mta").pw_uid
        assert send_one(server.port).startswith("250")
        server.wait_for_log(" <= ")
    finally:
        server.stop()
        shutil.rmtree(directory)


@pytest.mark.parametrize("index, allowed, cpu", [
    (1, {0, 1}, 0), (2, {0, 1}, 1), (3, {0, 1}, 0), (1, {6, 4}, 4), (2, {6, 4}, 6), (1, {3}, None),
])
def test_cpu_for_worker_takes_the_allowed_cpus_in_turn(index, allowed, cpu):
    from workers.process import cpu_for_worker
    assert cpu_for_worker(index, allowed) == cpu


def test_a_worker_the_kernel_will_not_bind_runs_unbound_and_says_so(monkeypatch):
    from types import SimpleNamespace
    from workers import process

    def refuse(pid, cpus):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(process.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(process.os, "sched_setaffinity", refuse)
    lines = []
    ctx = SimpleNamespace(index=2, cpu=None, logs=SimpleNamespace(main=lines.append))
    process.bind_smtp_worker(ctx)
    assert ctx.cpu is None
    assert lines == ["smtp worker 2 runs unbound: cannot bind it to a CPU (Operation not permitted)"]


def allowed_cpus(pid: int) -> str:
    return proc_status(pid)["Cpus_allowed_list"]


def wait_for_worker_records(server, count: int) -> list[dict]:
    wait_for(lambda: len(server.worker_statuses("smtp")) >= count, timeout=10,
             what=f"{count} smtp worker status records")
    return server.worker_statuses("smtp")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding needs two CPUs to choose from")
def test_smtp_workers_are_bound_to_cpus_in_turn_and_status_shows_them(mta):
    server = mta(workers=2, runners=1)
    cpus = sorted(os.sched_getaffinity(0))
    records = sorted(wait_for_worker_records(server, 2), key=lambda record: record["index"])
    assert [record["cpu"] for record in records] == cpus[:2]
    assert [allowed_cpus(record["pid"]) for record in records] == [str(cpu) for cpu in cpus[:2]]
    master_cpus = allowed_cpus(server.process.pid)
    assert all(allowed_cpus(pid) == master_cpus for pid in server.worker_pids("delivery"))
    listing = server.cli("status").stdout
    smtp_rows = [line.split() for line in listing.splitlines() if " smtp " in line]
    assert sorted(row[6] for row in smtp_rows) == [str(cpu) for cpu in cpus[:2]], listing


def test_no_smtp_worker_cpu_affinity_leaves_workers_unbound(mta):
    server = mta("no_smtp_worker_cpu_affinity", workers=2)
    records = wait_for_worker_records(server, 2)
    assert [record["cpu"] for record in records] == [None, None]
    master_cpus = allowed_cpus(server.process.pid)
    assert all(allowed_cpus(record["pid"]) == master_cpus for record in records)
    listing = server.cli("status").stdout
    assert [line.split()[6] for line in listing.splitlines() if " smtp " in line] == ["-", "-"], listing
