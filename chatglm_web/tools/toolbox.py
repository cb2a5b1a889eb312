"""What the page's modes need, built once at start-up: the tool registry and, with ``--code-interpreter``,
a pool of sandboxed kernels (one per browser session, started on its first execution). No Gradio here.

    toolbox = Toolbox.start(code_interpreter=settings.code_interpreter)   # raises StartupError if unsupported
    toolbox.modes                        -> ("Chat", "Tools", "Code interpreter")
    toolbox.runner(mode, session_id, client)
                                         -> None (Chat), a ToolRunner or an InterpreterRunner (blocking: the
                                            first Tools use loads the registry; call it off the event loop);
                                            ``client`` (an IP address) counts against the per-client kernel cap
    toolbox.end_session(session_id)      # the browser tab went away: its kernel is closed
    toolbox.close()                      # at shutdown: every kernel, the tool workers
"""

from __future__ import annotations

import logging
import threading

from chatglm_web.tools.agent import InterpreterRunner, ToolRunner
from chatglm_web.settings import StartupError

log = logging.getLogger(__name__)

CHAT, TOOLS, INTERPRETER = "Chat", "Tools", "Code interpreter"


class Toolbox:
    """``registry``: a ToolRegistry, or a function that loads one (called once, on the first use of Tools
    mode, so that an app nobody uses tools on starts no tool workers)."""

    tool_timeout = 10.0  # seconds one tool call may run

    def __init__(self, registry=None, sandboxes=None):
        self._registry = registry
        self.sandboxes = sandboxes
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def registry(self):
        with self._lock:
            if callable(self._registry) and not hasattr(self._registry, "specs"):
                self._registry = self._registry()
                for problem in getattr(self._registry, "problems", []):
                    log.warning("tool not loaded: %s", problem)
            return self._registry

    @classmethod
    def start(cls, *, code_interpreter: bool = False, tools_folder=None) -> "Toolbox":
        """The registry of ``tools_folder`` (default ``assets/tools``), and the sandbox pool when asked for."""
        from chatglm_web.tools.registry import ToolRegistry, default_tools_folder

        sandboxes = None
        if code_interpreter:
            from chatglm_web.tools.sandbox import SandboxPool, SandboxUnavailable, check_sandbox_support

            try:
                check_sandbox_support()
            except SandboxUnavailable as error:
                raise StartupError(f"--code-interpreter: the sandbox is not supported here: {error}") from None
            sandboxes = SandboxPool()
        folder = tools_folder or default_tools_folder()
        return cls(lambda: ToolRegistry.from_folder(folder), sandboxes)

    @property
    def modes(self) -> tuple[str, ...]:
        return (CHAT, TOOLS, INTERPRETER) if self.sandboxes is not None else (CHAT, TOOLS)

    def runner(self, mode: str, session_id: str | None, client: str | None = None):
        """The runner of ``mode`` for this browser session; ``ValueError`` for a mode this app does not offer."""
        if mode in (None, "", CHAT):
            return None
        if mode == TOOLS and self._registry is not None:
            return ToolRunner(self.registry, timeout=self.tool_timeout)
        if mode == INTERPRETER and self.sandboxes is not None:
            if not session_id:
                raise ValueError("the code interpreter needs a browser session")
            return InterpreterRunner(self.sandboxes.session(session_id, client))
        raise ValueError(f"this app does not offer the mode {mode!r}; choose one of {', '.join(self.modes)}")

    def end_session(self, session_id: str | None) -> None:
        if self.sandboxes is not None and session_id:
            self.sandboxes.close(session_id)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.sandboxes is not None:
            self.sandboxes.close_all()
        with self._lock:
            if self._registry is not None and hasattr(self._registry, "close"):
                self._registry.close()
