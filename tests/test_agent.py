"""The tool loop through the page's API: the app as a real Gradio server, the real tool registry (worker
processes, schema checks, timeouts), the model's replies scripted at the engine boundary (``ScriptedEngine``)
so that the protocol is exact: which messages the next prompt holds, what the chat shows."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client

from chatglm_web.messages import normalize_messages
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.page.steps import step_messages
from chatglm_web.tools.registry import ToolRegistry, default_tools_folder
from chatglm_web.page import conversation
from scripted_engine import ScriptedEngine, scripted_installer
from server_harness import chat_args, running_server

CALL = "```python\ntool_call({})\n```"

SLOW_TOOL = '''
import time
NAME = "slow"
DESCRIPTION = "Sleeps"
PARAMETERS = {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]}

def run(seconds):
    time.sleep(seconds)
    return "woke up"
'''


@pytest.fixture(scope="module")
def tools_folder(tmp_path_factory):
    """The built-in tools plus one that sleeps (for the timeout)."""
    folder = tmp_path_factory.mktemp("tools")
    for tool in default_tools_folder().glob("*.py"):
        (folder / tool.name).write_text(tool.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "slow.py").write_text(SLOW_TOOL)
    return folder


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, tools_folder):
    with running_server(model=str(long_reply_checkpoint)) as srv:
        srv.backend.backend.engine.shutdown()
        srv.page.toolbox._registry = ToolRegistry.from_folder(tools_folder)
        srv.page.toolbox.tool_timeout = 2.0
        yield srv


@pytest.fixture
def script(server, long_reply_checkpoint):
    """Put a scripted engine in the running app: ``script(reply, reply, ...)`` -> the engine."""
    return scripted_installer(server, long_reply_checkpoint)


def ask(client, message, mode="Tools"):
    """One turn through /chat: (the turn's chat messages, statistics line)."""
    return client.predict(*chat_args(message, mode=mode, max_new_tokens=256), api_name="/chat")


def steps_of(messages):
    return [m for m in messages if (m.get("metadata") or {}).get("title")]


def test_a_tool_call_runs_and_the_model_continues_with_its_result(server, script):
    engine = script([("calculator", CALL.format('expression="1234 * 23.5 / 100"'))],
                    [("", "23.5% of 1,234 is 289.99.")])
    client = Client(server.url, verbose=False)
    messages, stats = ask(client, "What is 23.5% of 1,234?")
    assert "Answer the following questions as best as you can" in engine.prompt_text(0)
    assert '"name": "calculator"' in engine.prompt_text(0)  # the specs are on the system message
    [step] = steps_of(messages)
    assert step["metadata"]["status"] == "done" and "calculator" in step["metadata"]["title"]
    assert "289.99" in step["content"] and "tool_call(" not in step["content"]
    assert messages[-1]["content"] == "23.5% of 1,234 is 289.99." and "reply" in stats
    # the second round's prompt holds the call and the tool's real result as the observation
    second = engine.prompt_text(1)
    assert "<|assistant|>calculator\n" in second.replace(" calculator", "calculator")
    observation = second.split("<|observation|>")[1].split("<|assistant|>")[0]
    assert json.loads(observation.strip())["result"] in (289.99, "289.99")

    # the next turn's prompt contains the first turn's call and observation (the history kept in the session)
    engine = script([("", "You are welcome.")])
    ask(client, "Thanks!")
    prompt = engine.prompt_text(0)
    assert prompt.count("<|observation|>") == 1 and "289.99" in prompt.split("<|observation|>")[1]
    assert prompt.index("tool_call(") < prompt.index("<|observation|>") < prompt.index("Thanks!")


def test_the_kept_history_survives_the_chatbot_round_trip(server, script):
    """What the browser keeps (the Chatbot's value, stored in BrowserState) gives back the exact messages."""
    call = ("calculator", CALL.format("expression='2**10'"))
    script([call], [("", "It is 1024.")])
    messages, _ = ask(Client(server.url, verbose=False), "2 to the 10th?")
    history = [{"role": "user", "content": "2 to the 10th?"}, *messages]
    chatbot = gr.Chatbot()
    round_trip = chatbot.preprocess(chatbot.postprocess(history))
    rebuilt = conversation("", round_trip, "next")
    assert rebuilt[1] == {"role": "assistant", "metadata": "calculator", "content": call[1]}
    assert rebuilt[2]["role"] == "observation" and json.loads(rebuilt[2]["content"])["result"] == 1024
    assert normalize_messages([rebuilt[3]]) == [{"role": "assistant", "content": "It is 1024."}]
    assert [m["role"] for m in rebuilt] == ["user", "assistant", "observation", "assistant", "user"]


def test_a_malformed_call_is_never_run_and_the_model_is_told(server, script):
    pwned = Path("/tmp/pwned-by-tool-call")
    pwned.unlink(missing_ok=True)  # left by an earlier run: the check below must see this run only
    evil = CALL.format(f"expression=__import__('os').system('touch {pwned}')")
    engine = script([("calculator", evil)], [("", "Sorry.")])
    messages, _ = ask(Client(server.url, verbose=False), "hi")
    assert not pwned.exists(), "the malformed call's code ran"
    [step] = steps_of(messages)
    assert "failed" in step["metadata"]["title"] and "not run" in step["content"]
    observation = engine.prompt_text(1).split("<|observation|>")[1]
    assert "not a literal value" in observation
    assert step_messages(step)[1]["content"] == json.dumps({"error": json.loads(observation.strip().split("<|assistant|>")[0])["error"]}, ensure_ascii=False)


def test_arguments_the_schema_refuses_and_a_tool_past_its_timeout_are_reported(server, script):
    engine = script([("calculator", CALL.format("expression=''"))], [("slow", CALL.format("seconds=30"))],
                    [("", "Done.")])
    messages, _ = ask(Client(server.url, verbose=False), "go")
    invalid, slow = steps_of(messages)
    assert "failed" in invalid["metadata"]["title"] and "expression" in invalid["content"]
    # stopped at its 2 s limit (the observation below says so), not left to sleep its 30 s
    assert "failed" in slow["metadata"]["title"] and slow["metadata"]["duration"] >= 2
    assert "expression" in engine.prompt_text(1).split("<|observation|>")[1]
    # the slow tool's observation (the third prompt's last one) names the tool and its 2 s time limit
    observation = engine.prompt_text(2).split("<|observation|>")[-1].split("<|assistant|>")[0].strip()
    assert observation == "The tool 'slow' took longer than 2 s and was stopped."
    assert messages[-1]["content"] == "Done."


def test_the_round_bound_stops_a_model_that_keeps_calling(server, script):
    call = [("calculator", CALL.format("expression='1+1'"))]
    engine = script(*[call] * 7)
    messages, _ = ask(Client(server.url, verbose=False), "loop")
    steps = steps_of(messages)
    assert len(engine.prompts) == 6  # 5 calls run, the 6th reply is a call that is not run
    assert len([s for s in steps if "Tool: calculator" in s["metadata"]["title"]]) == 5
    assert "Stopped" in steps[-1]["metadata"]["title"] and "5 tool calls" in steps[-1]["content"]


def test_a_sentence_then_a_call_in_one_reply_are_two_messages(server, script):
    """ChatGLM3 may write a sentence, then ``<|assistant|>`` and the call, in one generation."""
    engine = script([("", "Let me calculate."), ("calculator", CALL.format("expression='6*7'"))],
                    [("", "42.")])
    messages, _ = ask(Client(server.url, verbose=False), "6 times 7?")
    assert messages[0]["content"] == "Let me calculate." and "Tool: calculator" in messages[1]["metadata"]["title"]
    second = engine.prompt_text(1)
    assert second.index("Let me calculate.") < second.index("tool_call(") < second.index("<|observation|>")
    assert second.count("<|assistant|>") == 3  # the sentence, the call, the new generation prompt


def test_chat_mode_is_unchanged_and_an_unknown_mode_is_refused(server, script):
    engine = script([("", "Hello there.")])
    reply, _ = ask(Client(server.url, verbose=False), "hi", mode="Chat")
    assert reply == "Hello there." and "Answer the following" not in engine.prompt_text(0)
    with pytest.raises(Exception, match="does not offer the mode .Code interpreter.; choose one of Chat, Tools"):
        ask(Client(server.url, verbose=False), "hi", mode="Code interpreter")  # not started with the flag


# -- Code interpreter ---------------------------------------------------------------------------------------

PLOT = ("interpreter", "```python\nimport matplotlib.pyplot as plt\n"
        "import math\nprint(sum(i * i for i in range(10)))\nplt.plot([math.sin(x / 10) for x in range(63)])\n"
        "plt.show()\n```")


@pytest.fixture(scope="module")
def interpreter_server(long_reply_checkpoint):
    from chatglm_web.tools.sandbox import SandboxUnavailable, check_sandbox_support

    try:
        check_sandbox_support()
    except SandboxUnavailable as error:
        pytest.skip(f"the sandbox is not supported on this machine: {error}")
    with running_server(model=str(long_reply_checkpoint), code_interpreter=True) as srv:
        srv.backend.backend.engine.shutdown()
        try:
            yield srv
        finally:
            srv.page.toolbox.close()


def test_code_runs_in_the_sandbox_and_its_output_and_image_reach_the_page_and_the_model(interpreter_server,
                                                                                          long_reply_checkpoint):
    tokenizer = ChatGLM3Tokenizer.from_pretrained(long_reply_checkpoint)
    engine = ScriptedEngine(tokenizer, [[PLOT], [("", "The sum is 285; the plot is above.")]])
    interpreter_server.backend.backend.engine = engine
    messages, _ = ask(Client(interpreter_server.url, verbose=False), "Plot sin(x)", mode="Code interpreter")
    assert "你是一位智能AI助手" in engine.prompt_text(0)  # the official code interpreter system prompt
    [step] = steps_of(messages)
    assert step["metadata"]["status"] == "done" and "Code interpreter" in step["metadata"]["title"]
    assert "print(sum(" in step["content"] and "285" in step["content"]
    # gradio_client hands a file message back as its downloaded path
    images = [m for m in messages if str(m["content"]).endswith(".png") and "**Code**" not in str(m["content"])]
    assert len(images) == 1, messages
    observation = engine.prompt_text(1).split("<|observation|>")[1]
    assert "```result" in observation and "285" in observation and "【image】" in observation
    assert messages[-1]["content"] == "The sum is 285; the plot is above."


def test_the_page_offers_the_interpreter_only_with_the_flag_and_says_it_runs_code(server, interpreter_server):
    def mode_radio(srv):
        config = Client(srv.url, verbose=False).config
        [radio] = [c for c in config["components"] if c["props"].get("elem_id") == "mode"]
        return radio["props"]

    assert [c[0] for c in mode_radio(server)["choices"]] == ["Chat", "Tools"]
    props = mode_radio(interpreter_server)
    assert [c[0] for c in props["choices"]] == ["Chat", "Tools", "Code interpreter"]
    assert props["value"] == "Chat" and "sandbox" in props["info"]


def test_replies_without_code_take_no_kernel_and_a_new_visitor_still_gets_one(interpreter_server,
                                                                              long_reply_checkpoint):
    """Eight API calls in Code interpreter mode whose replies run no code used to hold all 8 kernels."""
    tokenizer = ChatGLM3Tokenizer.from_pretrained(long_reply_checkpoint)
    pool = interpreter_server.page.toolbox.sandboxes
    held = len(pool)   # kernels of earlier tests' sessions
    interpreter_server.backend.backend.engine = ScriptedEngine(tokenizer, [[("", "No code needed.")]] * 8)
    for _ in range(8):
        messages, _ = ask(Client(interpreter_server.url, verbose=False), "hi", mode="Code interpreter")
        assert messages[-1]["content"] == "No code needed."
    assert len(pool) == held
    interpreter_server.backend.backend.engine = ScriptedEngine(tokenizer, [[PLOT], [("", "Done.")]])
    messages, _ = ask(Client(interpreter_server.url, verbose=False), "Plot", mode="Code interpreter")
    [step] = steps_of(messages)
    assert step["metadata"]["status"] == "done" and "285" in step["content"] and len(pool) == held + 1
