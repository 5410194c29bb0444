"""The test broker itself: a real Mosquitto with a password file and an ACL refuses strangers."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def _connect(broker, username=None, password=None, timeout=5.0):
    """Connect with paho-mqtt 2.x and return (reason_code, client)."""
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311)
    if username is not None:
        c.username_pw_set(username, password)
    c.on_connect = on_connect
    c.connect_async(broker.host, broker.port, keepalive=10)
    c.loop_start()
    assert done.wait(timeout), "no CONNACK"
    return result["rc"], c


def _close(c):
    c.disconnect()
    c.loop_stop()


def test_good_credentials_accepted(broker):
    rc, c = _connect(broker, "device", broker.users["device"])
    try:
        assert not rc.is_failure
    finally:
        _close(c)


def test_anonymous_refused(broker):
    rc, c = _connect(broker)
    try:
        assert rc.is_failure and rc.getName() in ("Not authorized", "Bad user name or password")
    finally:
        _close(c)


def test_wrong_password_refused(broker):
    rc, c = _connect(broker, "device", "not-the-password")
    try:
        assert rc.is_failure
    finally:
        _close(c)


def test_acl_read_only_user_cannot_publish(broker):
    """The viewer may read the tree but what it publishes never reaches subscribers."""
    got = []
    seen = threading.Event()
    rc, sub = _connect(broker, "host", broker.users["host"])
    sub.on_message = lambda c, u, m: (got.append((m.topic, m.payload)), seen.set())
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe("test/#", qos=1)
    assert subscribed.wait(5)
    rc2, viewer = _connect(broker, "viewer", broker.users["viewer"])
    rc3, dev = _connect(broker, "device", broker.users["device"])
    try:
        viewer.publish("test/acl", b"from-viewer", qos=1).wait_for_publish(5)
        dev.publish("test/acl", b"from-device", qos=1).wait_for_publish(5)
        assert seen.wait(5)
        seen.clear()
        seen.wait(0.5)  # give a wrongly delivered viewer message time to arrive
        assert got == [("test/acl", b"from-device")]
    finally:
        for c in (sub, viewer, dev):
            _close(c)
