"""Prompt ids of tool and code-interpreter conversations equal the official ChatGLM3 layout.

The expected ids are written out here from the rule in the spec (§3, §7), with sentencepiece
alone: prefix ``[gMASK] sop``; each message ``[<|role|>] + sp.encode(metadata + "\\n") +
sp.encode(content)``; a system message with tools gets ``"\\n" + json.dumps(tools, indent=4,
ensure_ascii=False)`` appended to its content; the prompt ends with ``<|assistant|>``. The tools
are the registry's real specs and the observation is what the real tool returned.
"""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from chatglm_web.families.chatglm3.reply import parse_reply
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.tool_prompts import TOOLS_SYSTEM_PROMPT
from chatglm_web.tools.registry import ToolRegistry, default_tools_folder

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
            "<|observation|>"]
INTERPRETER_SYSTEM_PROMPT = (
    "你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，你可以运行代码并得到结果，"
    "如果运行结果有错误，你需要尽可能对代码进行改进。你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")


@pytest.fixture(scope="module")
def sp(tokenizer_model):
    return spm.SentencePieceProcessor(model_proto=tokenizer_model)


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return ChatGLM3Tokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def registry():
    with ToolRegistry.from_folder(default_tools_folder()) as loaded:
        yield loaded


def special(sp, name: str) -> int:
    """Special ids follow the sentencepiece vocabulary, in the official order."""
    return sp.get_piece_size() + SPECIALS.index(name)


def official_message(sp, role: str, content: str, metadata: str = "") -> list[int]:
    return [special(sp, f"<|{role}|>")] + sp.encode(metadata + "\n") + sp.encode(content)


TOOL_CALL = '```python\ntool_call(value=30, from_unit="C", to_unit="F")\n```'


@pytest.fixture(scope="module")
def observation(registry) -> str:
    """What the registry sends back for the assistant's tool call, parsed as the page parses it."""
    parsed = parse_reply("unit_conversion\n" + TOOL_CALL, tools_available=True)
    assert parsed.tool_call.name == "unit_conversion"
    assert parsed.tool_call.arguments == {"value": 30, "from_unit": "C", "to_unit": "F"}
    result = registry.call(parsed.tool_call.name, parsed.tool_call.arguments)
    assert result.ok, result.error
    return result.content


def test_observation_is_the_tools_json_text(observation):
    assert observation == ('{"value": 30, "from_unit": "C", "to_unit": "F", "kind": "temperature", '
                           '"result": 86.0}')


def test_tool_conversation_prompt_ids(sp, tok, registry, observation):
    specs = registry.specs()
    messages = [
        {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": specs},
        {"role": "user", "content": "30 摄氏度是多少华氏度？"},
        {"role": "assistant", "metadata": "", "content": "好的，让我来换算一下。"},
        {"role": "assistant", "metadata": "unit_conversion", "content": TOOL_CALL},
        {"role": "observation", "content": observation},
        {"role": "assistant", "content": "30 摄氏度等于 86 华氏度。"},
        {"role": "user", "content": "现在上海几点？"},
    ]
    system_text = TOOLS_SYSTEM_PROMPT + "\n" + json.dumps(specs, indent=4, ensure_ascii=False)
    expected = (
        [special(sp, "[gMASK]"), special(sp, "sop")]
        + [special(sp, "<|system|>")] + sp.encode("\n") + sp.encode(system_text)
        + [special(sp, "<|user|>")] + sp.encode("\n") + sp.encode("30 摄氏度是多少华氏度？")
        + [special(sp, "<|assistant|>")] + sp.encode("\n") + sp.encode("好的，让我来换算一下。")
        + [special(sp, "<|assistant|>")] + sp.encode("unit_conversion\n") + sp.encode(TOOL_CALL)
        + [special(sp, "<|observation|>")] + sp.encode("\n") + sp.encode(observation)
        + [special(sp, "<|assistant|>")] + sp.encode("\n") + sp.encode("30 摄氏度等于 86 华氏度。")
        + [special(sp, "<|user|>")] + sp.encode("\n") + sp.encode("现在上海几点？")
        + [special(sp, "<|assistant|>")]
    )
    ids = tok.build_chat_input(messages)
    assert ids == expected

    # The layout's landmarks: one role token per message, nothing special inside any text.
    specials = [i for i in ids if i >= sp.get_piece_size()]
    assert specials == [special(sp, n) for n in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>",
                                                 "<|assistant|>", "<|observation|>", "<|assistant|>",
                                                 "<|user|>", "<|assistant|>")]
    text = tok.decode(ids, skip_special_tokens=False)  # each sp.encode adds its dummy-prefix space
    assert "<|assistant|>unit_conversion\n " + TOOL_CALL + "<|observation|>\n " + observation + "<|assistant|>" in text


def test_system_message_lists_the_registrys_tools_as_indented_json(sp, tok, registry):
    ids = tok.build_chat_input([{"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": registry.specs()}],
                               add_generation_prompt=False)
    metadata_line = sp.encode("\n")
    assert ids[:3 + len(metadata_line)] == [special(sp, "[gMASK]"), special(sp, "sop"),
                                            special(sp, "<|system|>")] + metadata_line
    system_text = sp.decode(ids[3 + len(metadata_line):])
    assert system_text.startswith(TOOLS_SYSTEM_PROMPT + "\n[\n    {\n        \"name\": \"calculator\",")
    listed = json.loads(system_text[len(TOOLS_SYSTEM_PROMPT + "\n"):])
    assert listed == registry.specs()
    assert [tool["name"] for tool in listed] == ["calculator", "current_time", "search_documents", "unit_conversion"]
    assert "市里" in system_text and "\\u" not in system_text  # ensure_ascii=False
    # Tools carried by the message equal the same JSON written into the content by hand.
    by_hand = tok.build_chat_input([{"role": "system", "content": TOOLS_SYSTEM_PROMPT + "\n"
                                     + json.dumps(registry.specs(), indent=4, ensure_ascii=False)}],
                                   add_generation_prompt=False)
    assert ids == by_hand


def test_a_tool_error_goes_back_as_an_observation_too(sp, tok, registry):
    failed = registry.call("unit_conversion", {"value": 1, "from_unit": "kg", "to_unit": "m"})
    assert not failed.ok
    messages = [
        {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": registry.specs()},
        {"role": "user", "content": "1 kg is how many metres?"},
        {"role": "assistant", "metadata": "unit_conversion",
         "content": '```python\ntool_call(value=1, from_unit="kg", to_unit="m")\n```'},
        {"role": "observation", "content": failed.content},
    ]
    ids = tok.build_chat_input(messages)
    tail = official_message(sp, "observation", failed.content) + [special(sp, "<|assistant|>")]
    assert ids[-len(tail):] == tail
    assert "cannot convert mass (kg) to length (m)" in sp.decode(tail[2:-1])


def test_code_interpreter_conversation_prompt_ids(sp, tok):
    upload = "#File: /mnt/data/sales.csv\n#Size: 2048\n#File uploaded\n画出每月销售额的折线图"
    load_code = "```python\nimport pandas as pd\ndf = pd.read_csv('/mnt/data/sales.csv')\nprint(df.head())\n```"
    table = "```result\n   month  sales\n0      1    120\n1      2    135\n```"
    plot_code = ("```python\nimport matplotlib.pyplot as plt\nplt.plot(df['month'], df['sales'])\n"
                 "plt.show()\n```")
    image = "```result\n【image】\n```"
    messages = [
        {"role": "system", "content": INTERPRETER_SYSTEM_PROMPT},
        {"role": "user", "content": upload},
        {"role": "assistant", "metadata": "", "content": "好的，我先读取文件看看数据。"},
        {"role": "assistant", "metadata": "interpreter", "content": load_code},
        {"role": "observation", "content": table},
        {"role": "assistant", "metadata": "interpreter", "content": plot_code},
        {"role": "observation", "content": image},
        {"role": "assistant", "content": "折线图已经画好了：二月的销售额比一月高。"},
        {"role": "user", "content": "谢谢"},
    ]
    expected = (
        [special(sp, "[gMASK]"), special(sp, "sop")]
        + [special(sp, "<|system|>")] + sp.encode("\n") + sp.encode(INTERPRETER_SYSTEM_PROMPT)
        + [special(sp, "<|user|>")] + sp.encode("\n") + sp.encode(upload)
        + [special(sp, "<|assistant|>")] + sp.encode("\n") + sp.encode("好的，我先读取文件看看数据。")
        + [special(sp, "<|assistant|>")] + sp.encode("interpreter\n") + sp.encode(load_code)
        + [special(sp, "<|observation|>")] + sp.encode("\n") + sp.encode(table)
        + [special(sp, "<|assistant|>")] + sp.encode("interpreter\n") + sp.encode(plot_code)
        + [special(sp, "<|observation|>")] + sp.encode("\n") + sp.encode(image)
        + [special(sp, "<|assistant|>")] + sp.encode("\n") + sp.encode("折线图已经画好了：二月的销售额比一月高。")
        + [special(sp, "<|user|>")] + sp.encode("\n") + sp.encode("谢谢")
        + [special(sp, "<|assistant|>")]
    )
    assert tok.build_chat_input(messages) == expected


def test_metadata_changes_the_ids(sp, tok):
    """The metadata line is part of the prompt: an interpreter call is not a plain message."""
    plain = tok.build_chat_input([{"role": "assistant", "content": "```python\n1\n```"}], add_generation_prompt=False)
    code = tok.build_chat_input([{"role": "assistant", "metadata": "interpreter", "content": "```python\n1\n```"}],
                                add_generation_prompt=False)
    assert plain != code
    assert code[2:] == official_message(sp, "assistant", "```python\n1\n```", "interpreter")
