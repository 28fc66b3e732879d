"""STARTTLS on outbound SMTP, against the recording server with trustme certificates."""
import ssl

import pytest
import trustme
from gevent import ssl as gevent_ssl

from delivery_support import SmtpRecorder, log_lines, main_log, make_deliverer, smarthost_config, spool_message
from mta.delivery import COMPLETED, DEFERRED_MESSAGE


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def server_context(ca, **settings):
    context = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "mx.tls.test").configure_cert(context)
    for name, value in settings.items():
        setattr(context, name, value)
    return context


@pytest.fixture
def recorder(ca):
    server = SmtpRecorder(tls_context=server_context(ca)).start()
    yield server
    server.stop()


def config(port: int, options: str = "") -> str:
    return smarthost_config(f"127.0.0.1::{port}", options)


def test_starttls_is_used_when_offered_without_verification(tmp_path, recorder):
    deliverer, spool, logs = make_deliverer(tmp_path, config(recorder.port))
    message_id = spool_message(spool, "a@example.org", ["x@example.net"])
    assert deliverer.deliver(message_id) == COMPLETED
    [received] = recorder.messages
    assert received.tls
    assert recorder.commands[:3] == ["EHLO mta.test", "STARTTLS", "EHLO mta.test"]
    [line] = [line for line in log_lines(logs, message_id) if " => " in line]
    assert " H=127.0.0.1 [127.0.0.1] X=TLS1.3:TLS_AES_256_GCM_SHA384:256 C=\"250 OK id=rec1\"" in line


def test_verified_tls_with_the_right_ca(tmp_path, recorder, ca):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    options = f"  tls_verify_hosts = 127.0.0.1\n  tls_verify_certificates = {tmp_path}/ca.pem"
    deliverer, spool, _ = make_deliverer(tmp_path, config(recorder.port, options))
    assert deliverer.deliver(spool_message(spool, "a@example.org", ["x@example.net"])) == COMPLETED
    assert recorder.messages[0].tls


def test_verification_failure_defers_and_never_falls_back_to_clear(tmp_path, recorder):
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
    options = f"  tls_verify_hosts = 127.0.0.1\n  tls_verify_certificates = {tmp_path}/other.pem"
    deliverer, spool, logs = make_deliverer(tmp_path, config(recorder.port, options))
    message_id = spool_message(spool, "a@example.org", ["x@example.net"])
    assert deliverer.deliver(message_id) == DEFERRED_MESSAGE
    assert recorder.messages == []
    assert "defer (-37) H=127.0.0.1 [127.0.0.1]: TLS session: " in main_log(logs)
    assert "CERTIFICATE_VERIFY_FAILED" in main_log(logs)


def test_required_tls_not_offered_defers(tmp_path):
    plain = SmtpRecorder().start()
    try:
        deliverer, spool, logs = make_deliverer(tmp_path, config(plain.port, "  hosts_require_tls = *"))
        message_id = spool_message(spool, "a@example.org", ["x@example.net"])
        assert deliverer.deliver(message_id) == DEFERRED_MESSAGE
    finally:
        plain.stop()
    assert plain.messages == []
    assert ("defer (-38) H=127.0.0.1 [127.0.0.1]: a TLS session is required, but the server did not "
            "offer STARTTLS") in main_log(logs)


def test_failed_handshake_is_retried_in_clear(tmp_path, ca):
    broken = server_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2, verify_mode=ssl.CERT_REQUIRED)
    ca.configure_trust(broken)
    server = SmtpRecorder(tls_context=broken).start()
    try:
        deliverer, spool, _ = make_deliverer(tmp_path, config(server.port))
        assert deliverer.deliver(spool_message(spool, "a@example.org", ["x@example.net"])) == COMPLETED
    finally:
        server.stop()
    assert server.connections == 2
    assert not server.messages[0].tls


def test_hosts_avoid_tls(tmp_path, recorder):
    deliverer, spool, _ = make_deliverer(tmp_path, config(recorder.port, "  hosts_avoid_tls = 127.0.0.1"))
    assert deliverer.deliver(spool_message(spool, "a@example.org", ["x@example.net"])) == COMPLETED
    assert "STARTTLS" not in recorder.commands and not recorder.messages[0].tls
