"""Signed commands: authority beyond the broker's ACL (issue #18).

A command that changes the device or runs code on it (``Command.needs_signature``: deploy,
activate, rollback, profile of a given file) carries ``auth``::

    "auth": {"key_id": "<16 hex>", "device": "<site>/<device>" | "<site>/*" | "*/*" | "<device>",
             "expires_ms": <epoch ms>, "nonce": "<16-64 hex>", "sig": "<base64 Ed25519>"}

``sig`` is over the canonical JSON (sorted keys, no spaces) of ``{"cmd": <topic's command name>,
"body": <the request without auth>, "key_id", "device", "expires_ms", "nonce"}``: the signature
binds the command, every argument and the request_id. The agent accepts it only from a key in
``agent.command_keys`` (not revoked by ``agent.revoked_keys``), for this device, unexpired, not
more than ``MAX_TTL_S`` ahead, and with a nonce it has not seen (nonces persist in
``state_dir/nonces.json`` until they expire, so a replay after a restart is refused too).

The host signs with ``sign_request`` (deploy.remote does, with the user's key).
Imports agent.keys, agent.manifest (device selectors), agent.commands, agent.fsutil.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Union

from prune_pack.agent.commands import CommandError
from prune_pack.agent.fsutil import atomic_write, move_aside
from prune_pack.agent.keys import KEY_ID_RE, KeyLike, PrivateKeyLike, key_id, load_private_key, load_public_key, revoked_key_ids
from prune_pack.agent.manifest import device_selected

DEFAULT_TTL_S = 300.0  # a signed command is valid for five minutes
MAX_TTL_S = 3600.0  # the device refuses signatures valid for longer (bounds the nonce memory)
MAX_NONCES = 20000
_NONCE_RE = re.compile(r"^[0-9a-f]{16,64}$")
# Stable reasons of a refused command signature.
AUTH_REASONS = ("unsigned_command", "bad_command_signature", "untrusted_command_key", "revoked_key",
                "expired_command", "replayed_command", "wrong_device")


def _signed_bytes(cmd: str, body: dict, key_id_: str, device: str, expires_ms: int, nonce: str) -> bytes:
    doc = {"cmd": cmd, "body": body, "key_id": key_id_, "device": device, "expires_ms": expires_ms, "nonce": nonce}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_request(cmd: str, body: dict, key: PrivateKeyLike, device: str, ttl_s: float = DEFAULT_TTL_S,
                 now: Optional[float] = None) -> dict:
    """``body`` (with its request_id) plus ``auth`` signed with ``key`` for ``device``
    (``site/device`` or a selector such as ``site/*``)."""
    priv = load_private_key(key)
    body = {k: v for k, v in body.items() if k != "auth"}
    kid = key_id(priv)
    expires_ms = int(((time.time() if now is None else now) + ttl_s) * 1000)
    nonce = secrets.token_hex(16)
    sig = priv.sign(_signed_bytes(cmd, body, kid, device, expires_ms, nonce))
    return {**body, "auth": {"key_id": kid, "device": device, "expires_ms": expires_ms, "nonce": nonce,
                             "sig": base64.b64encode(sig).decode("ascii")}}


class NonceStore:
    """Nonces of accepted signed commands, kept until their command expires (persisted)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                self._seen = {k: int(v) for k, v in data.items() if isinstance(v, int)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            move_aside(path)  # a damaged file must not stop the agent; expired nonces are refused anyway

    def use(self, nonce: str, expires_ms: int, now_ms: int) -> None:
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if v >= now_ms}
            if nonce in self._seen:
                raise CommandError("replayed_command", "this signed command was already run")
            if len(self._seen) >= MAX_NONCES:
                raise CommandError("busy", "too many signed commands in flight; retry later")
            self._seen[nonce] = expires_ms
            atomic_write(self.path, json.dumps(self._seen).encode())


class CommandAuth:
    """The device's check of signed commands (``agent.command_keys``)."""

    def __init__(self, command_keys: Iterable[KeyLike], revoked: Iterable[Union[KeyLike, str]], device_id: str,
                 site: str, nonces: NonceStore, allow_unsigned: bool = False) -> None:
        self.keys = {key_id(k): load_public_key(k) for k in command_keys}
        self.revoked = revoked_key_ids(revoked)
        self.device_id, self.site, self.nonces = device_id, site, nonces
        self.allow_unsigned = allow_unsigned

    def check(self, cmd: str, request: dict, now: Optional[float] = None) -> Optional[str]:
        """The signing key id, None for an unsigned request that the configuration allows, else
        ``CommandError`` with one of ``AUTH_REASONS``. ``request`` still holds request_id and auth."""
        auth = request.get("auth")
        if auth is None:
            if self.allow_unsigned:
                return None
            why = "configure agent.command_keys" if not self.keys else "sign it with a key in agent.command_keys"
            raise CommandError("unsigned_command", f"{cmd} changes the device and needs a signed request ({why})")
        if not isinstance(auth, dict) or set(auth) != {"key_id", "device", "expires_ms", "nonce", "sig"}:
            raise CommandError("bad_command_signature", "auth must hold exactly key_id, device, expires_ms, nonce, sig")
        kid, device, exp, nonce, sig = (auth[k] for k in ("key_id", "device", "expires_ms", "nonce", "sig"))
        if not (isinstance(kid, str) and KEY_ID_RE.match(kid) and isinstance(device, str) and len(device) <= 300
                and isinstance(exp, int) and not isinstance(exp, bool) and isinstance(nonce, str)
                and _NONCE_RE.match(nonce) and isinstance(sig, str) and len(sig) <= 200):
            raise CommandError("bad_command_signature", "malformed auth fields")
        if kid in self.revoked:
            raise CommandError("revoked_key", f"command key {kid} is revoked")
        key = self.keys.get(kid)
        if key is None:
            raise CommandError("untrusted_command_key", f"key {kid} is not in agent.command_keys")
        try:
            raw = base64.b64decode(sig, validate=True)
            body = {k: v for k, v in request.items() if k != "auth"}
            key.verify(raw, _signed_bytes(cmd, body, kid, device, exp, nonce))
        except (binascii.Error, ValueError, TypeError, Exception) as e:  # InvalidSignature included
            raise CommandError("bad_command_signature", f"the signature does not match the request ({type(e).__name__})") from None
        now_ms = int((time.time() if now is None else now) * 1000)
        if exp < now_ms:
            raise CommandError("expired_command", f"the signature expired {(now_ms - exp) / 1000:.0f} s ago")
        if exp > now_ms + MAX_TTL_S * 1000:
            raise CommandError("expired_command", f"the signature is valid for more than {MAX_TTL_S:.0f} s")
        if not device_selected(device, self.device_id, self.site):
            raise CommandError("wrong_device", f"signed for {device}, this is {self.site}/{self.device_id}")
        self.nonces.use(nonce, exp, now_ms)
        return kid


def host_command_key(explicit: Optional[PrivateKeyLike] = None) -> Optional[PrivateKeyLike]:
    """The key a host signs commands with: ``explicit``, else ``$PRUNE_PACK_COMMAND_KEY``, else the
    user's signing key when it exists (one key for both roles unless configured apart)."""
    if explicit is not None:
        return explicit
    env = os.environ.get("PRUNE_PACK_COMMAND_KEY")
    if env:
        return env
    from prune_pack.agent.keys import default_key_path

    p = default_key_path()
    return p if p.is_file() else None
