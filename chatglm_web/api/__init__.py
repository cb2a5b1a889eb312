"""The HTTP API beside the page: OpenAI-compatible chat completions, /healthz and /metrics.

``openai_api``   the routes (models, chat completions streamed or not), errors in OpenAI's shape
``tool_calls``   ``tools`` / ``tool_choice`` in a request and ``tool_calls`` in the reply
``documents``    ``file`` content parts: documents read and fitted into the prompt
``metrics``      the Prometheus counters and the backend wrapper that keeps them
``http_guard``   body size limits and the failed-login throttle
``strict_json``  RFC 8259 JSON with a depth limit

May import: ``generation``, ``settings``, ``families`` (through the family interface), ``documents``,
``tools``. A backend is handed in by ``server``; nothing here imports the page.
"""
