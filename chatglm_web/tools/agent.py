"""The tool loop: a model family's tool calls and code interpreter on any ``ChatBackend``. No Gradio here.

    runner = ToolRunner(registry)        # Tools mode: tools from a ToolRegistry
    runner = InterpreterRunner(kernel)   # Code interpreter mode: code runs in this session's sandboxed kernel
    messages = [runner.system_message(), *history, {"role": "user", "content": question}]
    async for event in run_agent(backend, messages, params, runner):
        ...

One turn, round by round:
  the model's reply streams (``TextDelta`` for the text of plain messages, ``Queued`` and each
  round's ``Finished`` passed through); each assistant message it holds ends with ``MessageDone``
  (the exact message: role, metadata line, content). A reply whose last message has a
  metadata line (a tool name, ``interpreter``) is a call: ``StepStarted``, the runner executes it off
  the event loop (a tool through the registry, schema-checked and with a timeout; code in the
  sandbox), ``StepFinished`` with the result and the ``observation`` message sent back, and the
  model continues with the conversation plus the call and the observation.
The turn ends with ``AgentDone(messages, note)``: every message the turn added (assistant
messages with their metadata, observations), to keep in history so later prompts contain them.

Rules:
- The model family's dialect (``families.family.ToolCalls``: a runner's ``calls``, by default
  ``families.registry.tool_calls()``) writes the system messages and the observations and reads the
  calls, never evaluated (ChatGLM3's with ``ast``). A malformed call, an unknown tool or an argument
  the schema refuses is answered as an observation that says what is wrong (the model can correct
  itself), and shown as a failed step.
- At most ``max_rounds`` calls are executed per turn; a further call is not run and the turn ends
  with a note saying so.
- A reply cut off (max new tokens, Stop, an error) ends the turn; an unfinished call is not run.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from chatglm_web.families.family import ToolCallError, ToolCalls
from chatglm_web.families.registry import tool_calls
from chatglm_web.generation import ChatBackend, Finished, Queued, ReplyMetadata, SamplingParams, TextDelta
from chatglm_web.tools.sandbox import SandboxBusy

MAX_ROUNDS = 5
INTERPRETER = "interpreter"  # the kind of a code interpreter step (and the runner's)


@dataclass(frozen=True)
class Step:
    """One call and what came of it."""

    kind: str  # "tool" | "interpreter"
    name: str  # the metadata line: a tool name or "interpreter"
    call: dict  # the assistant message as generated: {"role", "metadata", "content"}
    arguments: dict | None = None  # a tool call's parsed arguments
    code: str | None = None  # the interpreter's code
    status: str = "pending"  # "pending" while it runs, then "done"
    ran: bool = False  # executed (False: refused before running, e.g. a malformed call)
    ok: bool = False
    output: str = ""  # the result as the page shows it (the observation's text)
    error: str | None = None  # a short account of what failed, for the page
    images: tuple[bytes, ...] = ()  # PNG images the code produced
    seconds: float = 0.0
    observation: dict | None = None  # the observation message sent back to the model


@dataclass(frozen=True)
class StepStarted:
    step: Step


@dataclass(frozen=True)
class StepFinished:
    step: Step


@dataclass(frozen=True)
class MessageDone:
    """An assistant message of the turn is complete (the exact message)."""

    message: dict


@dataclass(frozen=True)
class AgentDone:
    messages: list[dict]  # every message the turn added, in order: keep them in history
    note: str | None = None  # why the turn stopped early, for the page (e.g. the round bound)


AgentEvent = Queued | TextDelta | Finished | MessageDone | StepStarted | StepFinished | AgentDone


class ToolRunner:
    """Tools mode: calls go to a ``ToolRegistry`` (schema-checked arguments, a timeout per call)."""

    kind = "tool"

    def __init__(self, registry, timeout: float = 10.0, calls: ToolCalls | None = None):
        self.registry = registry
        self.timeout = timeout
        self.calls = calls or tool_calls()

    def system_message(self) -> dict:
        return self.calls.tools_system_message(self.registry.specs())

    async def run(self, step: Step) -> Step:
        if step.name not in self.registry.tools:
            known = ", ".join(sorted(self.registry.tools)) or "none"
            return _refused(step, f"there is no tool named {step.name!r}; the tools are: {known}", self.calls)
        try:
            call = self.calls.read_call(step.call)
        except ToolCallError as error:
            return _refused(step, str(error), self.calls)
        step = replace(step, arguments=call.arguments)
        result = await asyncio.to_thread(self.registry.call, step.name, step.arguments, timeout=self.timeout)
        return _finished(step, self.calls, ran=True, ok=result.ok, output=result.content, error=result.error,
                         seconds=result.seconds)


class InterpreterRunner:
    """Code interpreter mode: the ```python block of an ``interpreter`` message runs in the session's sandbox."""

    kind = INTERPRETER

    def __init__(self, sandbox, calls: ToolCalls | None = None):
        self.sandbox = sandbox   # anything with execute(code) -> ExecutionResult: a pool's SessionKernel
        self.calls = calls or tool_calls()

    @staticmethod
    def system_message(calls: ToolCalls | None = None) -> dict:
        """The interpreter mode's system message (callable on the class: no kernel needed)."""
        return (calls or tool_calls()).interpreter_system_message()

    async def run(self, step: Step) -> Step:
        code = self.calls.interpreter_code(step.call)
        if code is None:
            return _refused(step, f"there are no tools here, only the code interpreter; got {step.name!r}",
                            self.calls)
        step = replace(step, code=code)
        if not code:
            return _refused(step, "the interpreter message holds no code", self.calls)
        started = asyncio.get_running_loop().time()
        try:
            result = await asyncio.to_thread(self.sandbox.execute, code)
        except SandboxBusy as busy:   # no kernel can be had now: the message says when to try again
            return _refused(step, str(busy), self.calls)
        problem = ("the code ran past its time limit" if result.timed_out else result.error) or None
        if result.restarted:
            problem = (problem + "; " if problem else "") + "the kernel was restarted"
        return _finished(step, self.calls, ran=True, ok=problem is None, output=result.observation(),
                         error=problem, images=tuple(result.images),
                         seconds=asyncio.get_running_loop().time() - started)


def _finished(step: Step, calls: ToolCalls, *, ran: bool, ok: bool, output: str, error: str | None, images=(),
              seconds: float = 0.0) -> Step:
    return replace(step, status="done", ran=ran, ok=ok, output=output, error=error, images=images, seconds=seconds,
                   observation=calls.result_message(output))


def _refused(step: Step, problem: str, calls: ToolCalls) -> Step:
    """A call that is not run: the model is told why, as its observation."""
    return _finished(step, calls, ran=False, ok=False, output=json.dumps({"error": problem}, ensure_ascii=False),
                     error=problem)


@dataclass
class _Round:
    messages: list[dict] = field(default_factory=list)
    finished: Finished | None = None


async def _stream_round(backend: ChatBackend, messages: list[dict], params: SamplingParams,
                        result: _Round) -> AsyncIterator:
    """One model reply: its events for the page, its assistant messages collected in ``result``."""
    current = {"role": "assistant", "metadata": "", "content": ""}
    async with aclosing(backend.stream_chat(messages, params)) as stream:
        async for event in stream:
            if isinstance(event, ReplyMetadata):
                if current["metadata"] or current["content"]:  # the model started another message
                    result.messages.append(current)
                    yield MessageDone(current)
                current = {"role": "assistant", "metadata": event.text, "content": ""}
            elif isinstance(event, TextDelta):
                current["content"] += event.text
                if not current["metadata"]:
                    yield event  # a call's text is shown as its step, not as chat text
            else:
                if isinstance(event, Finished):
                    result.finished = event
                yield event
    if current["metadata"] and (result.finished is None or result.finished.reason != "stop"):
        return  # a call cut off: neither complete nor run, not kept
    if current["metadata"] or current["content"]:
        result.messages.append(current)
        yield MessageDone(current)


async def run_agent(backend: ChatBackend, messages: list[dict], params: SamplingParams, runner,
                    max_rounds: int = MAX_ROUNDS) -> AsyncIterator[AgentEvent]:
    """One turn of the tool loop (see the module doc). ``messages`` end with the user's message;
    raises what ``backend.stream_chat`` raises (``InvalidRequest``, ``BackendBusy``) before any event."""
    conversation = list(messages)
    added: list[dict] = []
    for executed in range(max_rounds + 1):
        round_ = _Round()
        async for event in _stream_round(backend, conversation + added, params, round_):
            yield event
        added += round_.messages
        last = round_.messages[-1] if round_.messages else None
        if round_.finished is None or round_.finished.reason != "stop" or not last or not last["metadata"]:
            yield AgentDone(added)  # an answer, or a reply cut off
            return
        if executed == max_rounds:
            yield AgentDone(added[:-1], note=f"Stopped after {max_rounds} tool calls without a final answer; "
                                             f"the model's next call ({last['metadata']}) was not run.")
            return
        step = Step(kind=runner.kind, name=last["metadata"], call=dict(last))
        yield StepStarted(step)
        step = await runner.run(step)
        added.append(step.observation)
        yield StepFinished(step)
