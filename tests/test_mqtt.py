"""agent.mqtt: the outbox on disk, broker URLs and secrets, the bounded offline queue with a
drop count, and TLS with a client certificate against a real Mosquitto."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import time

import pytest

from test_mqtt_helpers import DEV, SITE, Watcher

from prune_pack.agent.mqtt import MqttLink, Outbox, Topics, parse_broker_url, read_password
from prune_pack.agent.settings import DeviceSection, MqttSection, TlsSection
from prune_pack.errors import ConfigError


def test_outbox_bound_order_and_session_counter(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_items=5)
    assert ob.next_session() == 1 and ob.next_session() == 2
    for i in range(12):
        ob.put("t", {"i": i}, 0, False, historical=True)
    assert len(ob) == 5 and ob.dropped == 7
    rid, topic, msg, qos, retain, hist = ob.head()
    assert msg == {"i": 7} and hist is True  # the oldest were dropped
    ob.mark_sent(rid)
    assert ob.head()[2] == {"i": 8} and len(ob) == 4
    assert ob.resend_unconfirmed() == 1 and ob.head()[2] == {"i": 7}
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite", max_items=5)  # everything survives a restart
    assert ob.session == 2 and ob.next_session() == 3 and ob.dropped == 7 and len(ob) == 5
    ob.close()


def test_urls_and_passwords(tmp_path, monkeypatch):
    assert parse_broker_url("mqtt://10.0.0.2") == ("10.0.0.2", 1883, False)
    assert parse_broker_url("mqtts://broker.local") == ("broker.local", 8883, True)
    assert parse_broker_url("mqtt://h:1999") == ("h", 1999, False)
    for bad in ("tcp://h:1", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_password(MqttSection(password_file=str(tmp_path / "pw"))) == "s3cret"
    monkeypatch.setenv("PP_TEST_PW", "from-env")
    assert read_password(MqttSection(password_env="PP_TEST_PW")) == "from-env"
    with pytest.raises(ConfigError, match="PP_TEST_MISSING"):
        read_password(MqttSection(password_env="PP_TEST_MISSING"))
    with pytest.raises(ConfigError, match="password_file"):
        read_password(MqttSection(password_file=str(tmp_path / "nope")))
    t = Topics("pp", "s", "d")
    assert (t.status, t.cmd_filter, t.result("ping"), t.detections("cam1")) == (
        "pp/s/d/status", "pp/s/d/cmd/+", "pp/s/d/cmd/ping/res", "pp/s/d/detections/cam1")


def _link(tmp_path, url, queue_max=10000, **mqtt) -> MqttLink:
    m = MqttSection(broker=url, username="device", password_env="PP_DEVICE_PW", reconnect_min_s=1,
                    reconnect_max_s=1, queue_max=queue_max, keepalive_s=5, **mqtt)
    return MqttLink(DeviceSection(id=DEV, site=SITE), m, tmp_path / "state", lambda n, p, r: None,
                    lambda: {"agent_version": "t", "started_ts_ms": 1, "model": None, "previous": None, "streams": []})


def test_offline_queue_bounded_drop_count_and_replay(broker, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PP_DEVICE_PW", "device-secret")
    caplog.set_level(logging.DEBUG)
    broker.stop()
    link = _link(tmp_path, broker.url, queue_max=4)
    link.start()
    try:
        for i in range(10):  # produced while the broker is down
            link.send(link.topics.telemetry, link.envelope("telemetry/1", i=i), qos=0)
        assert link.queue_info() == {"pending": 4, "dropped": 6}
        broker.start()
        w = Watcher(broker)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 4 and time.monotonic() < deadline:
            got = [b for t, b, _ in w.device_messages() if t.endswith("/telemetry")]
            time.sleep(0.1)
        assert [b["i"] for b in got] == [6, 7, 8, 9] and all(b["historical"] is True for b in got)
        assert link.queue_info()["dropped"] == 6
        w.close()
    finally:
        link.stop()
    assert "device-secret" not in caplog.text


def test_reconnect_forgets_paho_copies_so_only_the_outbox_replays(broker, tmp_path, monkeypatch):
    """paho resends its in-memory QoS 1 copies right after the connect callback, ahead of what the
    outbox resends from disk: a replay could then arrive out of order. The link forgets them."""
    monkeypatch.setenv("PP_DEVICE_PW", "device-secret")
    broker.stop()
    link = _link(tmp_path, broker.url)
    stale = link.envelope("telemetry/1", stale=1)
    link.client.publish(link.topics.telemetry, json.dumps(stale), qos=1)  # paho keeps it to resend
    assert len(link.client._out_messages) == 1  # noqa: SLF001 - the state this test is about
    link.send(link.topics.telemetry, link.envelope("telemetry/1", i=1), qos=0)  # the outbox's row
    broker.start()
    w = Watcher(broker)
    link.start()
    try:
        deadline = time.monotonic() + 20
        while not any(b.get("i") == 1 for t, b, _ in w.device_messages() if t.endswith("/telemetry")):
            assert time.monotonic() < deadline, "the outbox row never arrived"
            time.sleep(0.1)
        time.sleep(1.0)  # paho would have resent its copy right after connecting
        tel = [b for t, b, _ in w.device_messages() if t.endswith("/telemetry")]
        assert [b.get("i") for b in tel] == [1] and not any(b.get("stale") for b in tel)
    finally:
        link.stop()
        w.close()


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool, san_ip: str | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san_ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def test_tls_with_ca_and_client_certificate(tmp_path, monkeypatch, caplog):
    from conftest import Broker
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def write(name, obj, key=False):
        p = tmp_path / name
        p.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()) if key else obj.public_bytes(serialization.Encoding.PEM))
        return str(p)

    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True)
    srv = _cert("127.0.0.1", ca_key, ca.subject, srv_key, ca=False, san_ip="127.0.0.1")
    cli = _cert("device", ca_key, ca.subject, cli_key, ca=False)
    files = {"ca": write("ca.pem", ca), "srv": write("srv.pem", srv), "srvkey": write("srv.key", srv_key, True),
             "cli": write("cli.pem", cli), "clikey": write("cli.key", cli_key, True)}
    b = Broker(tmp_path)
    listener = f"listener {b.port} 127.0.0.1\n"
    b.conf.write_text(b.conf.read_text().replace(listener, listener + f"cafile {files['ca']}\ncertfile {files['srv']}\n"
                                                 f"keyfile {files['srvkey']}\nrequire_certificate true\n"))
    b.start()
    monkeypatch.setenv("PP_DEVICE_PW", "device-secret")
    try:
        link = _link(tmp_path, f"mqtts://127.0.0.1:{b.port}",
                     tls=TlsSection(ca=files["ca"], cert=files["cli"], key=files["clikey"]))
        link.start()
        deadline = time.monotonic() + 15
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.connected, (tmp_path / "mosquitto.log").read_text()[-800:]
        link.stop()
        # without the client certificate the broker refuses the TLS handshake
        nocert = _link(tmp_path / "2", f"mqtts://127.0.0.1:{b.port}", tls=TlsSection(ca=files["ca"]))
        nocert.start()
        time.sleep(2.0)
        assert not nocert.connected
        nocert.stop()
        # a broker certificate from another CA: refused, and the agent logs why (it used to say nothing)
        other_key = ec.generate_private_key(ec.SECP256R1())
        other_ca = write("other-ca.pem", _cert("other-ca", other_key, None, other_key, ca=True))
        caplog.set_level("WARNING", logger="prune_pack.agent.mqtt")
        wrong = _link(tmp_path / "3", f"mqtts://127.0.0.1:{b.port}",
                      tls=TlsSection(ca=other_ca, cert=files["cli"], key=files["clikey"]))
        wrong.start()
        deadline = time.monotonic() + 15
        while "certificate verify failed" not in caplog.text.lower() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not wrong.connected
        wrong.stop()
        assert "certificate verify failed" in caplog.text.lower(), caplog.text[-800:]
    finally:
        b.stop()
