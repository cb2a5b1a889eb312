"""The system prompts ChatGLM3 was trained with for its tools and its code interpreter (spec §7), word for word.

In Tools mode the tools themselves follow as the system message's ``tools`` (``[{"name", "description",
"parameters"}]``), which the tokenizer writes after the prompt as indented JSON.
"""

from __future__ import annotations

#: The official tools system prompt; the specs go in the message's "tools".
TOOLS_SYSTEM_PROMPT = ("Answer the following questions as best as you can. "
                       "You have access to the following tools:")

#: The system prompt ChatGLM3 was trained with for the code interpreter (spec §7).
INTERPRETER_SYSTEM_PROMPT = (
    "你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，你可以运行代码并得到结果，"
    "如果运行结果有错误，你需要尽可能对代码进行改进。你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")

#: The metadata line of a code interpreter call.
INTERPRETER = "interpreter"
