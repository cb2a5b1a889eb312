"""What versions before the conversation list kept in the browser, read once on the server and moved on.

They kept the conversation (``chatglm-web-conversation``) and the settings (``chatglm-web-settings``) in
``gr.BrowserState``, whose front end encrypts with the secret it is given, and Gradio serves that secret
to every visitor in the page's configuration. The state secret must never be served (it seals share
links and stored conversations: whoever has it could forge both), so the page no longer gives it to a
``BrowserState``; ``store.js`` sends the two old entries as stored, and they are opened here, the way
Gradio's front end opens them (CryptoJS: AES-256-CBC, the key and IV derived from the passphrase
SHA-256(secret) in hex and the entry's salt with OpenSSL's EVP_BytesToKey and MD5), then removed.
"""

from __future__ import annotations

import base64
import hashlib
import json

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CONVERSATION_KEY = "chatglm-web-conversation"
SETTINGS_KEY = "chatglm-web-settings"
MAX_CHARS = 8_000_000


def _bytes_to_key(passphrase: bytes, salt: bytes, size: int = 48) -> bytes:
    derived, block = b"", b""
    while len(derived) < size:
        block = hashlib.md5(block + passphrase + salt).digest()
        derived += block
    return derived[:size]


def open_browser_state(stored, secret: str):
    """The value a ``gr.BrowserState`` with ``secret`` stored as ``stored`` (None when it is not one)."""
    if not isinstance(stored, str) or not stored or len(stored) > MAX_CHARS or ":" not in stored:
        return None
    try:
        sealed = base64.b64decode(stored.split(":", 1)[1], validate=False)
        if not sealed.startswith(b"Salted__") or len(sealed) < 32 or len(sealed) % 16:
            return None
        passphrase = hashlib.sha256(secret.encode()).hexdigest().encode()
        derived = _bytes_to_key(passphrase, sealed[8:16])
        decryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:])).decryptor()
        padded = decryptor.update(sealed[16:]) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        return json.loads((unpadder.update(padded) + unpadder.finalize()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def seal_browser_state(value, secret: str, salt: bytes | None = None) -> str:
    """What Gradio's front end would store for ``value`` (for tests, and to document the format exactly)."""
    import os

    salt = salt if salt is not None else os.urandom(8)
    passphrase = hashlib.sha256(secret.encode()).hexdigest().encode()
    derived = _bytes_to_key(passphrase, salt)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(value).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:])).encryptor()
    sealed = b"Salted__" + salt + encryptor.update(plain) + encryptor.finalize()
    return base64.b64encode(os.urandom(16)).decode() + ":" + base64.b64encode(sealed).decode()
