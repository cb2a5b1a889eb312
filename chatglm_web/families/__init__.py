"""Model families: everything that depends on which model this is.

``family``          the interface the rest of the app uses: ``ModelFamily`` (detect, load), ``ChatFormat``
                    (prompts, replies, token counts; ``tools``) and ``ToolCalls`` (a family's tool-call dialect)
``registry``        the families in the order they are asked (``family_for(folder)``, ``tokenizer_format``,
                    ``tool_calls()``)
``chatglm3/``       ChatGLM3 natively on transformers: config, weights, tokenizer, prompt, reply parsing,
                    tool and interpreter prompts, tool calls, step payloads; the only place that knows
                    ChatGLM3's special tokens. Entry point: ``chatglm3.FAMILY``
``template/``       any Hugging Face chat model through its tokenizer's chat template, and the small
                    offline demo model. Entry point: ``template.FAMILY``
``loading``         precision and device choice, memory estimates, and the load through the registry
``chat_format``     what every family's format shares: visible text streams, reply events, token counts
``streaming_text``  incremental detokenizing and stop strings

Outside ``families/`` nothing imports a family (``chatglm3``, ``template``): it asks ``registry`` and the
interfaces of ``family``. ``chatglm3/`` imports only ``generation``, ``messages``, the shared modules here
(``family``, ``chat_format``, ``streaming_text``) and itself (``tests/test_architecture.py`` checks both).

May import: ``generation``, ``messages``, ``settings``, ``spaces_env`` and itself. Nothing above (engine,
backends, api, tools, page, server).
"""
