"""MQTT side of the device: topics, the message envelope, an on-disk outbox, and ``MqttLink``.

Topics (see docs/mqtt.md): ``{prefix}/{site}/{device_id}/`` + ``status`` (retained, QoS 1),
``telemetry`` (QoS 0, retained), ``cmd/{name}`` (subscribed, QoS 1), ``cmd/{name}/res`` (QoS 1),
``detections/{stream}`` (QoS 0, live only).

Every payload is a JSON object with the envelope ``schema device_id site session seq ts_ms``
(+ ``historical: true`` on replay). ``session`` is a counter on disk, incremented before
every connection attempt (the Last Will set for that attempt carries it with ``seq`` 0);
``seq`` counts the messages of a session from 1.

Telemetry and command results always pass through the outbox (sqlite, in the state
directory): a sender thread publishes them in order while connected and deletes each one
once it was acknowledged (QoS 1), or, for QoS 0, once the connection outlived it by
1.5 x keepalive (a message written into a connection that was already dead is resent). While the broker is unreachable they
accumulate, bounded by ``mqtt.queue_max`` (oldest dropped, counted), and are replayed in order
with QoS 1 after reconnect. Delivery is at-least-once: consumers dedupe on
``(device_id, session, seq)``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from prune_pack.agent.fsutil import disk_full, move_aside
from prune_pack.agent.settings import DeviceSection, MqttSection
from prune_pack.errors import ConfigError

log = logging.getLogger("prune_pack.agent.mqtt")

SCHEMA_STATUS = "status/1"
SCHEMA_TELEMETRY = "telemetry/2"  # 2: streams as a list, histograms and counters (docs/mqtt.md)
SCHEMA_RESULT = "cmd-result/1"
SCHEMA_DETECTIONS = "detections/1"
SCHEMA_REQUEST = "cmd-request/1"  # what hosts send (documented; the device checks fields itself)


@dataclass(frozen=True)
class Topics:
    prefix: str
    site: str
    device_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def result(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/res"

    def detections(self, stream: str) -> str:
        return f"{self.base}/detections/{stream}"


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port, tls)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, got {redact(url)!r}")
    tls = u.scheme == "mqtts"
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker URL has an invalid port: {redact(url)!r}") from None
    return u.hostname, port, tls


def redact(url: Optional[str]) -> str:
    """A broker URL without any user:password part, for logs and messages."""
    if not url:
        return str(url)
    u = urlparse(url)
    return u._replace(netloc=u.netloc.rsplit("@", 1)[-1]).geturl()


def read_password(mqtt: MqttSection) -> Optional[str]:
    """The broker password from ``password_file`` or ``password_env`` (never logged)."""
    if mqtt.password_file:
        try:
            return Path(mqtt.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"mqtt.password_file: cannot read {mqtt.password_file}: {e.strerror}") from None
    if mqtt.password_env:
        pw = os.environ.get(mqtt.password_env)
        if pw is None:
            raise ConfigError(f"mqtt.password_env: environment variable {mqtt.password_env} is not set")
        return pw
    return None


def make_client(mqtt: MqttSection, client_id: str) -> Any:
    """A paho 2.x client with credentials, TLS and backoff configured (not yet connected)."""
    import paho.mqtt.client as paho

    if not mqtt.broker:
        raise ConfigError("mqtt.broker is not set (expected mqtt://host:1883 or mqtts://host:8883)")
    host, port, tls = parse_broker_url(mqtt.broker)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                    protocol=paho.MQTTv311)
    if mqtt.username:
        c.username_pw_set(mqtt.username, read_password(mqtt))
    if tls or mqtt.tls.ca:
        ctx = ssl.create_default_context(cafile=mqtt.tls.ca) if mqtt.tls.ca else ssl.create_default_context()
        if mqtt.tls.cert:
            ctx.load_cert_chain(mqtt.tls.cert, mqtt.tls.key)
        if mqtt.tls.insecure:
            ctx.check_hostname = False
        c.tls_set_context(ctx)
    c.reconnect_delay_set(max(1, int(round(mqtt.reconnect_min_s))), max(1, int(round(mqtt.reconnect_max_s))))
    c._prune_pack_target = (host, port)  # noqa: SLF001 - kept with the client for connect_async
    return c


# ---------------------------------------------------------------------- outbox


class Outbox:
    """Bounded FIFO of messages on disk (sqlite in WAL mode: survives kill -9), plus the
    persistent session counter and the drop count."""

    def __init__(self, path: str | Path, max_items: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items
        self._lock = threading.Lock()
        self.degraded: Optional[str] = None  # why messages are not durable right now (telemetry shows it)
        self.recreated = 0  # corrupt outboxes moved aside and replaced (persisted in meta)
        try:
            self._db = self._open(str(self.path))
        except sqlite3.DatabaseError as e:
            if disk_full(e):
                # A full disk must not take the agent offline: queue in memory until it is freed.
                log.error("outbox %s cannot be opened (%s): queueing in memory", self.path, e)
                self.degraded = f"outbox in memory: {e}"
                self._db = self._open(":memory:")
            else:
                # A corrupt queue is kept for a post-mortem and replaced; its messages are lost.
                for suffix in ("", "-wal", "-shm"):
                    move_aside(f"{self.path}{suffix}", "corrupt")
                log.error("outbox %s is corrupt (%s): moved aside, starting a new one", self.path, e)
                self._db = self._open(str(self.path))
                self._set_meta("recreated", 1)
        self.recreated = self._meta("recreated")

    @staticmethod
    def _open(target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
            db.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                       " payload TEXT NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, historical INTEGER NOT NULL,"
                       " sent_ms INTEGER)")
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
            db.execute("SELECT COUNT(*) FROM q").fetchone()  # reads the file: a damaged one fails here
            db.execute("SELECT COUNT(*) FROM meta").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (key, value))

    def next_session(self) -> int:
        with self._lock:
            s = self._meta("session") + 1
            self._set_meta("session", s)
            return s

    @property
    def session(self) -> int:
        with self._lock:
            return self._meta("session")

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped")

    def put(self, topic: str, message: dict, qos: int, retain: bool, historical: bool) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO q(topic, payload, qos, retain, historical) VALUES(?,?,?,?,?)",
                                 (topic, json.dumps(message, separators=(",", ":")), qos, int(retain), int(historical)))
                n = self._db.execute("SELECT COUNT(*) FROM q").fetchone()[0]
                if n > self.max_items:
                    over = n - self.max_items
                    self._db.execute("DELETE FROM q WHERE id IN (SELECT id FROM q ORDER BY id LIMIT ?)", (over,))
                    self._set_meta("dropped", self._meta("dropped") + over)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def head(self) -> Optional[tuple[int, str, dict, int, bool, bool]]:
        with self._lock:
            row = self._db.execute("SELECT id, topic, payload, qos, retain, historical FROM q WHERE sent_ms IS NULL"
                                   " ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return row[0], row[1], json.loads(row[2]), row[3], bool(row[4]), bool(row[5])

    def delete(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM q WHERE id=?", (row_id,))

    def mark_sent(self, row_id: int) -> None:
        """A QoS 0 message left through the socket: kept a while, in case the connection was
        already dead (see ``forget_sent`` / ``resend_unconfirmed``)."""
        with self._lock:
            self._db.execute("UPDATE q SET sent_ms=? WHERE id=?", (int(time.time() * 1000), row_id))

    def forget_sent(self, older_than_s: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM q WHERE sent_ms IS NOT NULL AND sent_ms < ?",
                             (int((time.time() - older_than_s) * 1000),))

    def resend_unconfirmed(self) -> int:
        """After a reconnect: QoS 0 messages sent shortly before the link died go again."""
        with self._lock:
            return self._db.execute("UPDATE q SET sent_ms=NULL, historical=1 WHERE sent_ms IS NOT NULL").rowcount

    def __len__(self) -> int:
        """Messages not yet sent."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM q WHERE sent_ms IS NULL").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------- link


class MqttLink:
    """The device's connection: status/LWT, commands in, telemetry/results out via the outbox.

    ``on_command(name, payload_bytes, retained)`` is called from paho's network thread and
    must not block (the daemon puts it on a queue). ``status_fields()`` returns the extra fields of the
    retained ``online`` status (active model ...). Without ``mqtt.broker`` the link is inert:
    messages are discarded, nothing is queued.
    """

    def __init__(self, device: DeviceSection, mqtt: MqttSection, state_dir: str | Path,
                 on_command: Callable[[str, bytes, bool], None],
                 status_fields: Callable[[], dict] = dict) -> None:
        self.device = device
        self.mqtt = mqtt
        self.topics = Topics(mqtt.prefix, device.site, device.id)
        self.on_command = on_command
        self.status_fields = status_fields
        self.enabled = bool(mqtt.broker)
        self.outbox = Outbox(Path(state_dir) / "outbox.sqlite", mqtt.queue_max)
        self._lock = threading.Lock()
        self._session = self.outbox.session or self.outbox.next_session()
        self._seq = 0
        self._connected = threading.Event()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._sender: Optional[threading.Thread] = None
        self._paho_thread: Optional[threading.Thread] = None
        self.client: Any = None
        self.connects = 0
        self._confirm_s = 1.5 * mqtt.keepalive_s + 1.0
        self._link_generation = 0  # +1 per (re)connect, see _drop_paho_copies
        self.detections_dropped = 0
        self._extra_subs: dict[str, Callable[[bytes], None]] = {}  # topic -> handler (network thread)
        self._connected_hooks: list[Callable[[], None]] = []
        self.send_failed = 0  # messages that could not be queued (disk full)
        if self.enabled:
            self.client = make_client(mqtt, mqtt.client_id or f"prune-pack-{device.id}")
            self.client.on_pre_connect = self._on_pre_connect
            self.client.on_connect = self._on_connect
            self.client.on_disconnect = self._on_disconnect
            self.client.on_message = self._on_message
            self.client.on_connect_fail = self._on_connect_fail
            self._last_connect_error = ""
            self._wrap_reconnect(self.client)

    # ---- envelope
    def envelope(self, schema: str, **fields: Any) -> dict:
        with self._lock:
            self._seq += 1
            env = {"schema": schema, "device_id": self.device.id, "site": self.device.site,
                   "session": self._session, "seq": self._seq, "ts_ms": int(time.time() * 1000)}
        env.update(fields)
        return env

    @property
    def session(self) -> int:
        return self._session

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ---- paho callbacks (network thread: never block here)
    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        # A new session per connection attempt; its Last Will carries this session's envelope.
        with self._lock:
            try:
                self._session = self.outbox.next_session()
            except sqlite3.Error as e:  # a full disk: a session number in memory, never a dead network thread
                log.error("outbox: cannot persist the session counter (%s)", e)
                self.outbox.degraded = f"outbox: {e}"
                self._session += 1
            self._seq = 0
            will = {"schema": SCHEMA_STATUS, "device_id": self.device.id, "site": self.device.site,
                    "session": self._session, "seq": 0, "ts_ms": int(time.time() * 1000), "state": "lost"}
        client.will_set(self.topics.status, json.dumps(will), qos=1, retain=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        self.connects += 1
        self._last_connect_error = ""
        self._drop_paho_copies(client)
        resent = self.outbox.resend_unconfirmed()
        if resent:
            log.info("resending %d QoS 0 messages sent just before the connection was lost", resent)
        client.subscribe(self.topics.cmd_filter, qos=1)  # renewed on every connect (clean session)
        try:
            fields = self.status_fields()
        except Exception as e:  # noqa: BLE001 - a status must go out even if a field fails
            log.warning("status fields failed: %s", e)
            fields = {}
        client.publish(self.topics.status, json.dumps(self.envelope(SCHEMA_STATUS, state="online", **fields)),
                       qos=1, retain=True)
        self._connected.set()
        for topic in self._extra_subs:
            client.subscribe(topic, qos=1)
        for hook in self._connected_hooks:
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - an add-on must not break the connection
                log.warning("on-connect hook failed: %s", e)
        log.info("connected to %s (session %d)", redact(self.mqtt.broker), self._session)
        with self._wake:
            self._wake.notify_all()

    def _drop_paho_copies(self, client: Any) -> None:
        """Forget paho's in-memory copies of unacknowledged publishes before it resends them.

        paho resends them right after this callback, ahead of the QoS 0 rows the outbox resends
        (``resend_unconfirmed``): a replay would then arrive out of order. Every such message is
        either an outbox row (on disk, resent in order by the sender), a status (a fresh one goes out
        below) or a live detection (stale by now). paho has no public call for this, hence the
        guarded private access; without it the old behaviour (duplicates, possible reordering) remains.
        """
        self._link_generation += 1  # tells the sender its pending publish will never be acknowledged
        lock, msgs = getattr(client, "_out_message_mutex", None), getattr(client, "_out_messages", None)
        if lock is None or msgs is None or not hasattr(client, "_inflight_messages"):
            return
        with lock:
            msgs.clear()
            client._inflight_messages = 0  # noqa: SLF001

    def _wrap_reconnect(self, client: Any) -> None:
        """paho's loop swallows why a connection attempt failed (TLS verification, refused port,
        DNS); log the cause once per distinct error, then let paho retry with its backoff."""
        original = client.reconnect

        def reconnect(*a: Any, **kw: Any) -> Any:
            try:
                return original(*a, **kw)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                text = f"{type(e).__name__}: {e}"
                if text != self._last_connect_error:
                    self._last_connect_error = text
                    log.warning("connecting to %s failed: %s", redact(self.mqtt.broker), text)
                raise

        client.reconnect = reconnect

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        log.debug("connection attempt to %s failed; retrying with backoff", redact(self.mqtt.broker))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected.is_set():
            log.warning("disconnected from the broker (%s); queueing on disk", reason_code)
        self._connected.clear()

    def add_subscription(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Also subscribe to ``topic`` (exact, renewed on every connect); ``handler(payload)`` runs on
        paho's network thread and must not block. Call before ``start``."""
        self._extra_subs[topic] = handler

    def add_connected_hook(self, hook: Callable[[], None]) -> None:
        """``hook()`` after every connect, once the ``online`` status went out (network thread)."""
        self._connected_hooks.append(hook)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        extra = self._extra_subs.get(msg.topic)
        if extra is not None:
            try:
                extra(msg.payload)
            except Exception as e:  # noqa: BLE001 - never kill paho's thread
                log.error("%s handler failed: %s", msg.topic, e)
            return
        parts = msg.topic.split("/")
        name = parts[-1] if len(parts) >= 2 and parts[-2] == "cmd" else ""
        try:
            self.on_command(name, msg.payload, bool(msg.retain))
        except Exception as e:  # noqa: BLE001 - never kill paho's thread
            log.error("command dispatch failed: %s", e)

    # ---- lifecycle
    def start(self) -> None:
        if not self.enabled:
            return
        host, port = self.client._prune_pack_target  # noqa: SLF001
        self.client.connect_async(host, port, keepalive=self.mqtt.keepalive_s)
        self.client.loop_start()
        self._paho_thread = getattr(self.client, "_thread", None)  # paho 2.x's loop thread (private; None if renamed)
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-outbox", daemon=True)
        self._sender.start()

    def stop(self, drain_s: float = 2.0) -> None:
        """Clean stop: flush the outbox briefly, publish ``offline`` (no Last Will), disconnect."""
        if not self.enabled:
            self.outbox.close()
            return
        deadline = time.monotonic() + drain_s
        while self.connected and len(self.outbox) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._sender:
            self._sender.join(5)
        if self.connected:
            info = self.client.publish(self.topics.status, json.dumps(self.envelope(SCHEMA_STATUS, state="offline")),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.5, deadline - time.monotonic()))
                if info.is_published():
                    self.outbox.forget_sent(0.0)  # the broker had everything sent before it
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    def alive(self) -> bool:
        """For the watchdog: the sender thread and paho's network thread both run (a callback that
        raised kills paho's thread, and nothing would reconnect)."""
        if not self.enabled or self._stop.is_set():
            return True
        paho_ok = self._paho_thread is None or self._paho_thread.is_alive()
        return paho_ok and self._sender is not None and self._sender.is_alive()

    # ---- publishing
    def send(self, topic: str, message: dict, qos: int = 0, retain: bool = False) -> None:
        """Queue a telemetry or result message on disk; the sender publishes it in order."""
        if not self.enabled:
            return
        try:
            self.outbox.put(topic, message, qos, retain, historical=not self.connected)
        except sqlite3.Error as e:  # a full disk: this message is lost (counted), the agent carries on
            self.send_failed += 1
            self.outbox.degraded = f"outbox: {e}"
            log.error("outbox: cannot queue a message on %s (%s)", topic, e)
            return
        if self.outbox.degraded and self.outbox.degraded.startswith("outbox:"):
            self.outbox.degraded = None  # space again
        with self._wake:
            self._wake.notify_all()

    def publish_live(self, topic: str, message: dict, qos: int = 0, retain: bool = False) -> bool:
        """Publish now or drop (detections: stale frames are worthless later)."""
        if not self.enabled or not self.connected:
            self.detections_dropped += 1
            return False
        info = self.client.publish(topic, json.dumps(message, separators=(",", ":")), qos=qos, retain=retain)
        return info.rc == 0

    def republish_status(self) -> None:
        """The retained ``online`` status with fresh fields (after a model switch)."""
        if self.enabled and self.connected:
            fields = self.status_fields()
            self.client.publish(self.topics.status, json.dumps(self.envelope(SCHEMA_STATUS, state="online", **fields)),
                                qos=1, retain=True)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._send_some()
            except Exception as e:  # noqa: BLE001 - the sender must outlive any surprise (the rows stay on disk)
                log.error("outbox sender: %s: %s", type(e).__name__, e)
                time.sleep(0.5)

    def _send_some(self) -> None:
        import paho.mqtt.client as paho

        last_forget = 0.0
        while not self._stop.is_set():
            if self.connected and time.monotonic() - last_forget > 1.0:
                # A QoS 0 message is only known delivered once the connection outlived it by
                # the time a dead broker takes to be noticed (keepalive).
                self.outbox.forget_sent(self._confirm_s)
                last_forget = time.monotonic()
            head = self.outbox.head() if self.connected else None
            if head is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            row_id, topic, message, qos, retain, historical = head
            if historical:
                message["historical"] = True
                qos = 1  # a replay must not be lost to the next hiccup
            info = self.client.publish(topic, json.dumps(message, separators=(",", ":")), qos=qos, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                # Not connected after all. The row stays on disk (durable across kill -9); paho
                # may also send its in-memory QoS 1 copy after the reconnect: a duplicate, which
                # consumers drop by (session, seq) - at least once, never lost.
                time.sleep(0.1)
                continue
            published = self._wait_published(info)
            if published:
                if qos == 0:
                    self.outbox.mark_sent(row_id)
                else:
                    self.outbox.delete(row_id)  # acknowledged by the broker ...
                    self.outbox.forget_sent(0.0)  # ... and so was every QoS 0 message before it (in-order stream)
            else:
                time.sleep(0.1)  # no ack (connection lost?): the row is sent again when connected

    def _wait_published(self, info: Any) -> bool:
        """Wait for the broker's acknowledgement (up to the keepalive), giving up at once when the
        link was re-established meanwhile: paho's copy was dropped, the row goes again in order."""
        generation = self._link_generation
        deadline = time.monotonic() + max(2.0, float(self.mqtt.keepalive_s))
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                info.wait_for_publish(0.2)
            except (RuntimeError, ValueError):  # paho raises when the connection was lost meanwhile
                return False
            if info.is_published():
                return True
            if self._link_generation != generation:
                return False
        return False

    def queue_info(self) -> dict:
        return {"pending": len(self.outbox), "dropped": self.outbox.dropped}
