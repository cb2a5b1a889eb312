"""Wiring: settings -> one loaded model -> engine -> backend -> page -> Gradio server."""

from __future__ import annotations

import atexit
import logging
import os
import sys

from chatglm_web import browser_secret
from chatglm_web.process_secrets import hide_secrets
from chatglm_web.settings import SECRET_ENV_VARS, Settings, error_line, parse_settings

log = logging.getLogger("chatglm_web")


def hide_all_secrets(settings: Settings) -> None:
    """The settings' secrets off the command line; their variables and the browser-storage key's out of the
    environment that child processes inherit (``browser_state_secret()`` still answers the key, from memory)."""
    browser_secret.take_from_environ()
    hide_secrets(settings.secret_values(), [*SECRET_ENV_VARS, browser_secret.ENV_VAR])


def engine_type(zero_gpu: bool):
    """The class that serves generation: ``ZeroGPUEngine`` (imports ``spaces``) or the batching ``Engine``."""
    if zero_gpu:
        from chatglm_web.engine.zero_gpu import ZeroGPUEngine

        return ZeroGPUEngine
    from chatglm_web.engine.scheduler import Engine

    return Engine


def build_backend(settings: Settings):
    """The one backend the page and the API share: a remote server (``--backend``) or a model loaded here."""
    from chatglm_web.api.metrics import MeteredBackend
    from chatglm_web.backends.local import LocalBackend

    if settings.backend:
        from chatglm_web.backends.remote import build_remote_backend

        return MeteredBackend(build_remote_backend(settings))
    from chatglm_web.families.loading import load_chat_model

    limits = settings.limits  # how much the engine admits and what a request may ask for, as one object
    if settings.engine_process and not settings.zero_gpu:
        from chatglm_web.engine.process import EngineProcess

        # the model is loaded in the engine's own process; this one gets its chat format and info
        engine, chat_format, info = EngineProcess.start(settings, max_batch_size=limits.max_batch_size,
                                                        max_queue=limits.max_queue)
    else:
        # the batching Engine here, or one @spaces.GPU call per reply in ZeroGPU mode (imports spaces first)
        engine_class = engine_type(settings.zero_gpu)
        loaded = load_chat_model(settings)
        engine = engine_class(loaded.model, max_batch_size=limits.max_batch_size, max_queue=limits.max_queue,
                              context_length=loaded.info.context_length)
        chat_format, info = loaded.chat_format, loaded.info
    return MeteredBackend(LocalBackend(engine, chat_format, info,
                                       max_input_tokens=limits.max_input_tokens,
                                       max_new_tokens=limits.max_new_tokens,
                                       max_input_chars=limits.max_input_chars))


def build_app(settings: Settings):
    """Load the model (once) and return (page, backend, launch kwargs) without starting the server.

    ``page.toolbox`` holds the tools and the code interpreter's kernels; ``page.toolbox.close()`` ends them
    (also done at exit)."""
    from chatglm_web.api.openai_api import api_app_kwargs
    from chatglm_web.branding import load_branding
    from chatglm_web.page import build_page, launch_kwargs
    from chatglm_web.tools.toolbox import Toolbox

    toolbox = Toolbox.start(code_interpreter=settings.code_interpreter)  # an unsupported sandbox fails first
    atexit.register(toolbox.close)
    try:
        backend = build_backend(settings)
    except BaseException:
        toolbox.close()
        raise
    branding = load_branding(settings.assets_dir)
    page = build_page(backend, branding, max_new_tokens=min(settings.max_new_tokens, backend.info.context_length),
                      toolbox=toolbox, listed_chat_api=not settings.mcp)
    page.toolbox = toolbox
    # Admission is the engine's job: --max-batch-size running, --max-queue waiting, everyone else is told
    # at once that the server is busy. So Gradio passes every request straight through (no concurrency
    # limit of its own, under which requests would wait unseen and unbounded); its queue's max_size only
    # bounds what a flood can pile up before the engine has answered.
    capacity = settings.limits.max_batch_size + settings.limits.max_queue
    page.queue(default_concurrency_limit=None, max_size=4 * capacity)
    kwargs = launch_kwargs(branding)
    if settings.mcp:  # the chat (the page's /chat endpoint) and every tool as MCP tools, behind the same login
        from chatglm_web.api.mcp import add_tools

        add_tools(page, backend, toolbox)
        kwargs["mcp_server"] = True
    # The OpenAI-compatible API, /healthz and /metrics: FastAPI routes placed before Gradio's own.
    kwargs["app_kwargs"] = {**kwargs.get("app_kwargs", {}),
                            **api_app_kwargs(backend, metrics=backend.metrics, api_key=settings.api_key,
                                             auth=settings.auth_pair)}
    return page, backend, kwargs


def main(argv: list[str] | None = None) -> None:
    """Parse settings, load the model, serve. A start-up failure is one line on stderr and exit code 2."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = parse_settings(argv)
        hide_all_secrets(settings)  # off the command line and out of the environment, before any child process starts
        page, backend, kwargs = build_app(settings)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # bad settings, a model that cannot load, no offline model: never a traceback
        log.error("cannot start: %s", error_line(error))
        sys.exit(2)
    log.info("model ready: %s", backend.info)
    try:
        page.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                    auth=settings.auth_pair, **kwargs)
    except Exception as error:  # the port is taken, the host cannot be bound, no share link
        backend.shutdown()
        page.toolbox.close()
        log.error("cannot start: %s", error_line(error))
        sys.exit(2)
    page.toolbox.close()
