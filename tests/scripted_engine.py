"""An engine with the real ``Engine.submit(prompt_ids, params, stop_ids)`` surface whose replies are scripted.

Each reply is a list of ChatGLM3 assistant messages ``(metadata, content)``, turned into the token ids the
model would generate (``<|assistant|>`` between messages, each message's metadata line and content encoded
as the prompt encodes them), and streamed one token per event. The prompt ids of every request are kept
in ``prompts``, so a test can check what the model was shown.
"""

from __future__ import annotations

import itertools
import time

from chatglm_web.engine.admission import AdmissionPolicy
from chatglm_web.engine.events import Done, Token
from chatglm_web.generation import FinishReason


def reply_ids(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    ids = []
    for index, (metadata, content) in enumerate(messages):
        if index:
            ids.append(tokenizer.special_token_ids["<|assistant|>"])
        ids += tokenizer.encode(metadata + "\n") + tokenizer.encode(content)
    return ids


class ScriptedRequest:
    _ids = itertools.count(1)

    def __init__(self, ids: list[int]):
        self.id = next(self._ids)
        self.ids = ids
        self.submitted_at = time.perf_counter()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self):
        return None

    async def batches(self):
        for token in self.ids:
            yield [Token(token)]
        yield [Done(FinishReason.STOP)]


class ScriptedEngine:
    """Satisfies ``chatglm_web.engine.protocol.GenerationEngine`` (tests/test_engine_protocol.py checks it)."""

    alive = True
    load = (0, 0)
    admission = AdmissionPolicy()
    context_length = 8192

    def __init__(self, tokenizer, replies: list[list[tuple[str, str]]]):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompts: list[list[int]] = []

    def check_capacity(self) -> None:
        pass

    def submit(self, prompt_ids, params, stop_ids=()) -> ScriptedRequest:
        self.prompts.append(list(prompt_ids))
        messages = self.replies.pop(0) if self.replies else [("", "The script has ended.")]
        return ScriptedRequest(reply_ids(self.tokenizer, messages))

    def prompt_text(self, index: int) -> str:
        """A recorded prompt as text, special tokens shown."""
        return self.tokenizer.decode(self.prompts[index], skip_special_tokens=False)

    def shutdown(self) -> None:
        pass


def scripted_installer(server, checkpoint):
    """``install(reply, reply, ...)``: put a ScriptedEngine with these replies into the running app's backend
    (its tokenizer from ``checkpoint``) and return it."""
    from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer

    tokenizer = ChatGLM3Tokenizer.from_pretrained(checkpoint)

    def install(*replies):
        engine = ScriptedEngine(tokenizer, list(replies))
        server.backend.backend.engine = engine
        return engine

    return install
