"""Data sealed with the state secret: compressed, encrypted and authenticated (AES-256-GCM), as URL-safe text.

What the page keeps in the browser (each conversation, the list's entries) and what a share link carries
are sealed here, on the server: the browser only stores the text, and anything it sends back that was
not sealed by this app with the same secret (tampered, truncated, from another app) is refused. Every
replica started with the same ``$CHATGLM_WEB_STATE_SECRET`` opens what another one sealed.

    sealer = Sealer(secret, "storage")      # one key per purpose: a share link never opens as storage
    text = sealer.seal(value)               # "1." + base64url(nonce ‖ AES-GCM(zlib(JSON)))
    sealer.open(text, max_chars=…)          # the value; ``Unreadable`` with the reason otherwise
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import zlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "1."
#: The most a sealed value may expand to when opened (a small token must not unpack into gigabytes).
MAX_OPENED_BYTES = 16 * 1024 * 1024


class Unreadable(ValueError):
    """Not something this app sealed with this secret for this purpose (or it is damaged)."""


class Sealer:
    def __init__(self, secret: str, purpose: str):
        if not secret:
            raise ValueError("a sealer needs a secret")
        key = hmac.new(secret.encode(), f"chatglm-web/{purpose}".encode(), hashlib.sha256).digest()
        self._aead = AESGCM(key)
        self._purpose = purpose.encode()

    def seal(self, value) -> str:
        plain = zlib.compress(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(), 9)
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, plain, self._purpose)
        return PREFIX + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, text, max_chars: int | None = None):
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise Unreadable("not sealed by this app")
        if max_chars is not None and len(text) > max_chars:
            raise Unreadable(f"too long: {len(text):,} characters, the limit is {max_chars:,}")
        body = text[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise Unreadable("damaged (not base64url)") from None
        if len(raw) < 12 + 16:
            raise Unreadable("damaged (too short)")
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], self._purpose)
        except InvalidTag:
            raise Unreadable("sealed with another secret, or changed since") from None
        unpacker = zlib.decompressobj()
        try:
            data = unpacker.decompress(plain, MAX_OPENED_BYTES)
        except zlib.error:
            raise Unreadable("damaged (not compressed data)") from None
        if unpacker.unconsumed_tail:
            raise Unreadable(f"opens to more than {MAX_OPENED_BYTES:,} bytes")
        try:
            return json.loads(data)
        except ValueError:
            raise Unreadable("damaged (not JSON)") from None
