"""chatglm-web: a browser chat demo for ChatGLM3-6B (and any Hugging Face chat model).

The data path, top to bottom, and the folder that owns each part:

    settings.py        every option, declared once (flags, environment, README table, validation)
    generation.py      the vocabulary every layer shares: ``SamplingParams``, ``ChatEvent``s, ``ChatBackend``
    messages.py        chat messages as plain data: ``plain_text``, ``normalize_messages`` (below every layer)
    families/          model families behind one interface (``family.py``, ``registry.py``): detect, load,
                       prompt, reply parsing, tool calls (``chatglm3/``, ``template/``); nothing outside
                       ``families/chatglm3/`` knows ChatGLM3's tokens, and nothing outside ``families/`` imports it
    engine/            continuous batching on one loaded model: admission, scheduler (prefill + decode
                       steps), KV slots, sampling, typed events; in this process, its own process, or ZeroGPU
    backends/          ``ChatBackend``s: ``local`` (an engine here) and ``remote`` (vLLM / SGLang over HTTP)
    tools/             the tool registry, tool workers, the sandboxed code interpreter and the agent loop
    documents/         files read safely (worker process with limits) and fitted into a prompt
    conversations/     the conversation tree, sealed browser storage, share links, downloads
    api/               the OpenAI-compatible API, /healthz, /metrics and the HTTP guards
    page/              the Gradio page
    server.py          the wiring: settings -> model -> engine -> backend -> page + API -> Gradio

Each folder's ``__init__`` says what it owns and what it may import; ``tests/test_architecture.py`` holds
the import rules and checks there are no import cycles.
"""
