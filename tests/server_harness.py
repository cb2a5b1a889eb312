"""Start the real app (same wiring as ``app.py``) in-process on a free loopback port."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from dataclasses import dataclass

from chatglm_web.server import build_app
from chatglm_web.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    backend: object
    page: object

    @property
    def engine(self):
        return self.backend.engine


@contextmanager
def running_server(**settings):
    settings = Settings(**{"precision": "fp32", "device": "cpu", "port": free_port(), **settings})
    settings.model_explicit = True
    page, backend, launch_kwargs = build_app(settings)
    page.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs)
    try:
        yield RunningServer(f"http://127.0.0.1:{settings.port}/", backend, page)
    finally:
        page.close()
        backend.engine.shutdown()
