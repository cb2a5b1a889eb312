"""The one generation interface shared by every entry point (the page, Gradio's API, later HTTP).

A ``ChatBackend`` takes a conversation (messages in the OpenAI/Gradio "messages" shape:
``{"role": ..., "content": str}``) and ``SamplingParams`` and streams ``ChatEvent``s:

    Queued(position)      while waiting for a slot (position 1 = next)
    ReplyMetadata(text)   families with tool calls only: the metadata line of the assistant message whose text follows
                          (a tool name, "interpreter"), once that line is complete; see below
    TextDelta(text)       a piece of the visible reply; the pieces concatenate to the whole reply
    Finished(...)         once, last: why it ended and token counts / speed; ``metadata`` is the
                          metadata line of the reply's last assistant message ("" for a plain answer)

Such a family's reply may hold several assistant messages (the model writes its assistant role token and
starts another, e.g. a sentence and then a tool call). ``ReplyMetadata`` comes before the text of every
message with a non-empty metadata line, and before every message after the first (then possibly
with ""): the text that follows belongs to a new message. A consumer that only wants the answer's
text (a plain chat) can ignore it.

``preview(messages, params)`` tells without generating what such a request would send: its prompt
tokens (split into system prompt, history and new message), the messages dropped to fit the context
and the prompt's text (``PromptPreview``).

``LocalBackend`` (``backends/local.py``) runs the model in this process; a remote
OpenAI-compatible server (vLLM, SGLang) can implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, AsyncIterator, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError


class InvalidRequest(ValueError):
    """Bad input from a user or API client; the message is meant to be shown to them.

    ``param`` names the offending option when there is one (e.g. "temperature").
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_valid_text(text: str, what: str = "message") -> None:
    """Raise ``InvalidRequest`` when ``text`` holds an unpaired UTF-16 surrogate: not valid text, it cannot be
    encoded as UTF-8 (tokenizers and Gradio's reply both fail on it). The page and the API check with this."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(
            f"The {what} contains an invalid character (an unpaired UTF-16 surrogate {text[error.start]!r} at "
            f"position {error.start}, e.g. from text cut in the middle of an emoji); remove it and try again."
        ) from None


class BackendBusy(RuntimeError):
    """The waiting queue is full; the client should try again shortly."""


class SamplingParams(BaseModel):
    """How one reply is sampled. Each option is declared here once: its default, its range, its
    label. The page's sliders, the validation of every request and the API schema derive from
    these fields (``option()``, ``SamplingParams.model_json_schema()``).

    Constructing one with a bad value raises ``InvalidRequest`` with a message naming the option.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    temperature: float = Field(0.8, ge=0.0, le=2.0, title="Temperature",
                               description="randomness; 0 = always the most likely token",
                               json_schema_extra={"step": 0.05})
    top_p: float = Field(0.8, ge=0.05, le=1.0, title="Top-p",
                         description="sample from the smallest set of tokens whose probability reaches top_p",
                         json_schema_extra={"step": 0.05})
    max_new_tokens: int = Field(1024, ge=1, le=32768, title="Max new tokens",
                                description="longest reply in tokens (the server may allow less)",
                                json_schema_extra={"step": 1})
    top_k: int = Field(0, ge=0, le=200, title="Top-k (0 = off)",
                       description="sample only from the k most likely tokens; 0 = no limit",
                       json_schema_extra={"step": 1})
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0, title="Repetition penalty",
                                      description="> 1 makes tokens already in the conversation less likely",
                                      json_schema_extra={"step": 0.01})
    seed: int | None = Field(None, ge=0, le=2**63 - 1, title="Seed",
                             description="the same seed and settings repeat a reply; none = random")
    stop: tuple[Annotated[str, StringConstraints(min_length=1, max_length=64)], ...] = Field(
        (), max_length=4, title="Stop strings", description="the reply ends before the first of these (up to 4)")

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as error:
            problems = error.errors(include_url=False)
            param = str(problems[0]["loc"][0]) if problems and problems[0]["loc"] else None
            raise InvalidRequest(_explain(error), param=param) from None

    @classmethod
    def from_form(cls, **values) -> "SamplingParams":
        """From a form's or slider's numbers: 3.0 is taken for a whole-number option, 1 for a float one.

        Strings, booleans and fractions for whole-number options are still rejected.
        """
        cleaned = {}
        for name, value in values.items():
            field = cls.model_fields.get(name)
            if field is not None and not isinstance(value, bool):
                if field.annotation in (int, int | None) and isinstance(value, float) and value.is_integer():
                    value = int(value)
                elif field.annotation is float and isinstance(value, int):
                    value = float(value)
            cleaned[name] = value
        return cls(**cleaned)

    def validated(self, max_new_tokens_limit: int | None = None) -> "SamplingParams":
        """Return self, or raise ``InvalidRequest`` when max_new_tokens is over the server's limit."""
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens must be a whole number between 1 and {max_new_tokens_limit}, "
                                 f"got {self.max_new_tokens}", param="max_new_tokens")
        return self


@dataclass(frozen=True)
class Option:
    """One sampling option as a control shows it."""

    name: str
    label: str
    description: str
    default: float | int | None
    minimum: float | int | None
    maximum: float | int | None
    step: float | int | None


def option(name: str) -> Option:
    """Default, range and label of ``SamplingParams.<name>``, for building a slider or form."""
    field = SamplingParams.model_fields[name]
    bounds = {}
    for rule in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(rule, key, None) is not None:
                bounds[key] = getattr(rule, key)
    extra = field.json_schema_extra or {}
    return Option(name=name, label=field.title or name, description=field.description or "", default=field.default,
                  minimum=bounds.get("ge", bounds.get("gt")), maximum=bounds.get("le", bounds.get("lt")),
                  step=extra.get("step"))


def _explain(error: ValidationError) -> str:
    """Pydantic's errors as one sentence a user can act on: which option, what is allowed, what came."""
    parts = []
    for item in error.errors(include_url=False):
        name = str(item["loc"][0]) if item["loc"] else "value"
        field = SamplingParams.model_fields.get(name)
        got = item.get("input")
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown sampling option {name!r}")
            continue
        if field is None:
            parts.append(f"{name}: {item['msg']}")
            continue
        if name == "stop":
            parts.append(f"stop must be up to 4 strings of 1 to 64 characters, got {got!r:.60}")
            break
            continue
        spec = option(name)
        kind = "a whole number" if field.annotation in (int, int | None) else "a number"
        text = f"{name} must be {kind} between {spec.minimum} and {spec.maximum}"
        if field.default is None:
            text += " (or empty)"
        parts.append(f"{text}, got {got!r:.40}")
    return "; ".join(parts)


class FinishReason(StrEnum):
    """Why a reply ended: the same values from the engine to the API, the metrics and the page."""

    STOP = "stop"  # the model ended its reply (a stop token), or a stop string was met
    LENGTH = "length"  # the reply budget or the context was used up
    CANCELLED = "cancelled"  # Stop, a disconnect, or nobody listening any more
    ERROR = "error"  # generation failed; ``Finished.error`` says why


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class ReplyMetadata:
    text: str  # the metadata line, stripped: a tool name, "interpreter", or "" (a new plain message)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason  # a plain string is taken and checked: "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # from the first generated token to the last
    time_to_first_token: float = 0.0  # from submission
    dropped_messages: int = 0  # oldest history messages left out to fit the context
    error: str | None = None
    max_new_tokens_clamped: int | None = None  # the reply budget, when lowered to what the context leaves
    metadata: str = ""  # a family's metadata line of the last assistant message (a tool name, "interpreter")

    def __post_init__(self):
        object.__setattr__(self, "reason", FinishReason(self.reason))

    @property
    def tokens_per_second(self) -> float:
        return (self.completion_tokens - 1) / self.seconds if self.seconds > 0 and self.completion_tokens > 1 else 0.0


ChatEvent = Queued | ReplyMetadata | TextDelta | Finished


@dataclass(frozen=True)
class PromptPreview:
    """What the model would be shown for a request, before it is sent (``ChatBackend.preview``).

    ``total`` is the number of prompt tokens, equal to ``Finished.prompt_tokens`` of ``stream_chat`` for the
    same messages and params when ``exact``. It is split into ``system`` (the prompt's fixed start and the
    system message), ``new`` (the last message and what the format appends after it, e.g. the assistant's
    generation prompt) and ``history`` (the kept messages between them); the three sum to ``total``.
    ``budget`` is what the prompt may use (the context minus room for the reply), ``reply_budget`` the
    reply's token budget as the request would send it, ``dropped_messages`` the oldest non-system
    messages left out to fit (as in ``Finished.dropped_messages``). ``text`` is the prompt as text with
    the special (role) tokens written out.

    ``exact`` is False only where the backend cannot know what the model sees (a remote server that applies
    its own chat template): then ``total`` and the split are counted with the local tokenizer on the kept
    messages, or estimated from their characters when there is no tokenizer here at all, and ``text`` is
    the local rendering of those messages.
    """

    total: int
    system: int
    history: int
    new: int
    context_length: int
    budget: int
    reply_budget: int
    dropped_messages: int
    text: str
    exact: bool = True

    def __post_init__(self):
        parts = (self.system, self.history, self.new)
        if min(parts) < 0 or sum(parts) != self.total:
            raise ValueError(f"the prompt's parts {parts} do not add up to its {self.total} tokens")


@dataclass
class ModelInfo:
    """What the page header shows about the loaded model."""

    name: str
    precision: str
    device: str
    context_length: int
    offline_demo: bool = False
    notes: list[str] = field(default_factory=list)   # for the operator: logged, not shown to visitors
    tools: bool = False   # the chat format can carry tool calls (Tools and Code interpreter modes)


class ChatBackend(Protocol):
    info: ModelInfo

    def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[ChatEvent]:
        """Stream the assistant's reply to ``messages`` (the last one is the user's new turn).

        Raises ``InvalidRequest`` for bad input and ``BackendBusy`` when the queue is full, before
        anything is yielded. Closing the iterator early cancels the generation.
        """
        ...

    def preview(self, messages: list[dict], params: SamplingParams) -> PromptPreview:
        """What ``stream_chat(messages, params)`` would send: token counts, dropped messages, the prompt's text.

        Synchronous and CPU-bound (it tokenizes and fits the conversation as ``stream_chat`` does): run it in
        a thread off the event loop. Raises ``InvalidRequest`` exactly where ``stream_chat`` would for the
        same input (bad messages or settings, a message too long for the context); never ``BackendBusy``.
        """
        ...

    async def health(self) -> tuple[bool, str]:
        """(ready to generate, a short account): for ``GET /healthz``."""
        ...
