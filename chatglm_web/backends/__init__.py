"""Chat backends: the ``generation.ChatBackend`` implementations the page and the API share.

``local``          a model loaded in this server, through an ``engine``: messages are fitted to the
                   context and turned into prompt ids by the model's family
``remote``         an OpenAI-compatible server (vLLM, SGLang), with the same fitting and admission
``remote_format``  the remote model's tokenizer and chat format, read from its Hub files

May import: ``generation``, ``settings``, ``families``, ``engine``. Not ``api``, ``page`` or ``server``.
"""
