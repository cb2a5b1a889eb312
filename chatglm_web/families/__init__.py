"""Model families: everything that depends on which model this is.

``chatglm3/``       ChatGLM3 natively on transformers: config, weights, tokenizer, prompt, reply parsing,
                    tool and interpreter prompts; the only place that knows ChatGLM3's special tokens
``template/``       any Hugging Face chat model through its tokenizer's chat template, and the small
                    offline demo model
``loading``         precision and device choice, memory estimates, and which family loads a folder
``chat_format``     what every family's format offers: prompt ids, token counts, visible text streams
``streaming_text``  incremental detokenizing and stop strings

May import: ``generation``, ``settings``, ``spaces_env`` and itself. Nothing above (engine, backends, api,
tools, page, server).
"""
