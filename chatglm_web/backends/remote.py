"""``RemoteBackend``: the ``ChatBackend`` for a model served by an OpenAI-compatible server (vLLM, SGLang).

    backend = RemoteBackend.connect("http://gpu-box:8000", api_key=None, model="THUDM/chatglm3-6b")

messages -> checked and fitted to the server's context exactly as ``LocalBackend`` does
            (``max_model_len`` from ``GET /v1/models``)
  ChatGLM3 -> the app's own injection-safe prompt ids -> ``POST /v1/completions`` (prompt = ids,
              token ids back, stop ids and every sampling setting sent) -> the app's incremental
              detokenizer and reply filter
  others   -> the kept messages -> ``POST /v1/chat/completions`` (the server's chat template)
         -> ``TextDelta``s and one ``Finished``; one log line per request.

``preview(messages, params)`` builds the same request without sending it: exact for ChatGLM3 (the ids
are what is sent); for other families counted with the local tokenizer and chat template on the kept
messages, and estimated from their characters when there is no tokenizer here (``exact=False``).

Failures of the server never raise out of ``stream_chat``: unreachable, connection closed, an
HTTP error status or silence past the read timeout end the reply with ``Finished(reason="error",
error=<one plain sentence naming the server>)``, which the page shows as "Generation failed: ...".
Each request uses its own connection, so the next request works as soon as the server is back.
Only ``InvalidRequest`` (bad input) and ``BackendBusy`` (this page's line is full, or the server
answered 429) are raised, before anything is yielded. Closing the stream early closes the HTTP
response, and the server aborts the generation.

Admission works as with the local engine (``admission.AdmissionLine``): at most ``max_batch_size``
requests are sent to the server at once, ``max_queue`` more wait here with ``Queued`` positions,
and the rest are told at once that the server is busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import time
from contextlib import aclosing
from typing import AsyncIterator
from urllib.parse import urlsplit

import httpx

from chatglm_web.families.chat_format import ReplyEvents, merge_text
from chatglm_web.families.family import carries_tools
from chatglm_web.messages import normalize_messages
from chatglm_web.engine.admission import AdmissionLine, AdmissionPolicy
from chatglm_web.generation import (BackendBusy, ChatEvent, Finished, FinishReason, InvalidRequest, ModelInfo, PromptPreview, Queued,
                         SamplingParams, TextDelta)
from chatglm_web.backends.local import CHARS_PER_CONTEXT_TOKEN, LocalBackend, describe_prompt, kept_messages
from chatglm_web.settings import DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, StartupError
from chatglm_web.families.streaming_text import StopStrings

log = logging.getLogger("chatglm_web.requests")

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0  # silence (no token) longer than this ends a reply with an error
CHARS_PER_TOKEN_ESTIMATE = 4  # without a tokenizer here: about 4 characters of English text per token
MARKER_TOKENS_ESTIMATE = 8  # and the role markers and separators a chat template adds to each message


class RemoteBackendError(StartupError, ConnectionError):
    """The generation server cannot be used (at start-up); the message is one line naming it."""


class _Failure(Exception):
    """A generation failure, already in plain words for ``Finished.error``."""


def normalize_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing ``/`` or ``/v1``; RemoteBackendError otherwise."""
    text = (url or "").strip().rstrip("/")
    parts = urlsplit(text)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and bool(httpx.URL(text).host)
    except (httpx.InvalidURL, ValueError):
        valid = False
    if not valid:
        raise RemoteBackendError(f"--backend must be an http:// or https:// URL such as http://127.0.0.1:8000, "
                                 f"got {url!r}")
    return text[:-3] if text.endswith("/v1") else text


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _server_message(response: httpx.Response) -> str:
    """The error text of an OpenAI-style error body, or the start of whatever came."""
    try:
        body = json.loads(response.text)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") or error.get("detail") if isinstance(error, dict) else error
    except ValueError:
        message = response.text
    return " ".join(str(message or "").split())[:300]


def _status_failure(url: str, response: httpx.Response) -> str:
    text = f"the generation server at {url} answered {response.status_code} {response.reason_phrase}"
    message = _server_message(response)
    return f"{text}: {message}" if message else text


def _transport_failure(url: str, error: httpx.RequestError, *, answering: bool,
                       read_timeout: float = READ_TIMEOUT) -> str:
    """What went wrong on the way to or from the server, in plain words naming it."""
    if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"the generation server at {url} cannot be reached ({error or type(error).__name__})"
    if isinstance(error, httpx.ReadTimeout):
        return f"the generation server at {url} sent nothing for {read_timeout:.0f} s"
    if isinstance(error, httpx.DecodingError):
        return f"the generation server at {url} sent a reply that cannot be decoded ({error})"
    if answering:
        return f"the generation server at {url} closed the connection in the middle of the reply"
    return f"the generation server at {url} closed the connection before answering"


def list_models(url: str, api_key: str | None = None, timeout: float = CONNECT_TIMEOUT) -> list[dict]:
    """``GET /v1/models``: the served models (``id``; vLLM adds ``max_model_len``). RemoteBackendError if unusable."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=timeout)
    except httpx.RequestError as error:
        raise RemoteBackendError(_transport_failure(url, error, answering=False)) from None
    if response.status_code in (401, 403):
        raise RemoteBackendError(f"the generation server at {url} refused the API key ({response.status_code}); "
                                 "check --backend-api-key")
    if response.status_code != 200:
        raise RemoteBackendError(_status_failure(url, response) + " (is it an OpenAI-compatible server?)")
    try:
        models = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        models = None
    if not isinstance(models, list) or not all(isinstance(m, dict) and m.get("id") for m in models):
        raise RemoteBackendError(f"{url}/v1/models did not answer an OpenAI model list; is {url} a vLLM, SGLang "
                                 "or other OpenAI-compatible server?")
    if not models:
        raise RemoteBackendError(f"the generation server at {url} serves no model")
    return models


def _choose_model(url: str, models: list[dict], wanted: str | None) -> dict:
    for model in models:
        if wanted in (model["id"], model.get("root")):
            return model
    if len(models) == 1:
        return models[0]
    raise RemoteBackendError(f"the generation server at {url} serves {', '.join(m['id'] for m in models)}; "
                             "name one of them with --model")


async def _server_events(response: httpx.Response, url: str) -> AsyncIterator[dict]:
    """The JSON chunks of a server-sent event stream, up to ``[DONE]``; an error event raises ``_Failure``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _Failure(f"the generation server at {url} sent an event that is not JSON: {data[:80]!r}") from None
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise _Failure(f"the generation server at {url} reported an error: {message}")
        if isinstance(chunk, dict):
            yield chunk


class _ReplyText:
    """Streamed choices -> ``TextDelta`` / ``ReplyMetadata`` events: token ids through the app's detokenizer
    (``chat_format``, ``ReplyEvents``) or the server's text deltas (no format), then the request's stop strings."""

    def __init__(self, chat_format, stop: tuple[str, ...]):
        self._events = ReplyEvents(chat_format, stop) if chat_format is not None else None
        self._stop_ids = set(chat_format.stop_token_ids) if chat_format is not None else set()
        self._stops = StopStrings(stop)

    @property
    def stopped(self) -> bool:
        return self._events.stopped if self._events is not None else self._stops.hit

    @property
    def metadata(self) -> str:
        return self._events.metadata if self._events is not None else ""

    def add(self, choice: dict) -> tuple[list, int]:
        """(new events, tokens it took): up to a stop string, nothing after one."""
        if self._events is None:
            content = (choice.get("delta") or {}).get("content") or ""
            text = self._stops.feed(content)
            return ([TextDelta(text)] if text else []), 1 if content and not self.stopped else 0
        events, tokens = [], 0
        for token_id in choice.get("token_ids") or []:
            if self.stopped:
                break
            if token_id in self._stop_ids:  # ends the reply; never text
                continue
            tokens += 1
            events += self._events.push(token_id)
        return merge_text(events), tokens

    def finish(self) -> list:
        """Text held back (an incomplete character, a possible stop string's start) when the reply ends."""
        if self._events is not None:
            return self._events.finish()
        if self.stopped:
            return []
        rest = self._stops.finish()
        return [TextDelta(rest)] if rest else []


class RemoteBackend:
    """``ChatBackend`` on an OpenAI-compatible server, with the local engine's admission rules."""

    def __init__(self, url: str, served_model: str, chat_format, info: ModelInfo, *, api_key: str | None = None,
                 max_input_tokens: int | None = None, max_new_tokens: int | None = None,
                 max_input_chars: int | None = None, read_timeout: float = READ_TIMEOUT,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE):
        self.url = normalize_url(url)
        self.served_model = served_model
        self.format = chat_format  # safe_prompt_ids (ChatGLM3) -> /v1/completions; a template or None -> chat
        self.info = info
        self.api_key = api_key
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens or info.context_length
        self.max_input_chars = max_input_chars or CHARS_PER_CONTEXT_TOKEN * info.context_length
        self.timeout = httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout)
        self._ids = itertools.count(1)
        self.admission = AdmissionLine(AdmissionPolicy(max_batch_size, max_queue))

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, *, model: str | None = None, **limits) -> "RemoteBackend":
        """Ask the server what it serves and load that model's tokenizer (``model`` names it when the server's
        id is not a local folder or Hub id). Raises ``RemoteBackendError`` (one line) for an unusable URL, and
        ``ModelLoadError`` when ``model`` is given and its tokenizer cannot be loaded. ``limits``: the
        ``max_input_tokens``, ``max_new_tokens``, ``max_input_chars`` and ``read_timeout`` of ``__init__``."""
        from chatglm_web.backends.remote_format import load_remote_format

        url = normalize_url(url)
        served = _choose_model(url, list_models(url, api_key), model)
        notes = []
        try:
            remote = load_remote_format(model or served["id"])
        except StartupError as error:
            if model:
                raise
            remote = None
            notes.append(f"No tokenizer for {served['id']} here ({error}); the server's chat template formats "
                         "the prompts and long conversations are not shortened. Name the model with --model.")
        context = int(served.get("max_model_len") or (remote.context_length if remote else 0) or DEFAULT_CONTEXT_LENGTH)
        info = ModelInfo(name=model or served["id"], precision="set by the server", device=url,
                         context_length=context, notes=notes,
                         tools=remote is not None and carries_tools(remote.chat_format))
        backend = cls(url, served["id"], remote.chat_format if remote else None, info, api_key=api_key, **limits)
        log.info("generation server %s serves %s (context %d tokens, %s)", url, served["id"], context,
                 "prompt ids from the app" if backend.uses_token_ids else "the server's chat template")
        return backend

    @property
    def uses_token_ids(self) -> bool:
        return bool(getattr(self.format, "safe_prompt_ids", False))

    # the same checks, context fitting and reply budget as the local model
    validate = LocalBackend.validate
    prompt_budget = LocalBackend.prompt_budget
    prepare = LocalBackend.prepare

    def _request(self, messages: list[dict], params: SamplingParams) -> tuple[str, dict, list[int] | None, int, int]:
        """(endpoint, JSON body, prompt ids or None, dropped messages, reply budget); raises InvalidRequest."""
        if self.format is None:
            self.validate(messages, params)
            ids, dropped, budget = None, 0, params.max_new_tokens
        else:
            ids, dropped, budget = self.prepare(messages, params)
        body = {"model": self.served_model, "max_tokens": budget, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k or -1, "repetition_penalty": params.repetition_penalty,
                "stream": True, "stream_options": {"include_usage": True}}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop and not self.uses_token_ids:  # token ids only: the server cannot see text, stops apply here
            body["stop"] = list(params.stop)
        if self.uses_token_ids:
            body.update(prompt=ids, stop_token_ids=self.format.stop_token_ids, detokenize=False,
                        return_token_ids=True)
            return "/v1/completions", body, ids, dropped, budget
        kept = kept_messages(messages, dropped)
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in normalize_messages(kept)]
        return "/v1/chat/completions", body, ids, dropped, budget

    def preview(self, messages: list[dict], params: SamplingParams) -> PromptPreview:
        """What ``stream_chat`` would send, from the same ``_request`` (see ``ChatBackend.preview``).

        Exact when the app sends the prompt ids (ChatGLM3). Sent as chat messages, the server applies its own
        chat template (``exact=False``): the kept messages are counted and shown with the local tokenizer and
        template of the same model, or, with no tokenizer here, estimated at ``CHARS_PER_TOKEN_ESTIMATE``
        characters a token plus ``MARKER_TOKENS_ESTIMATE`` for each message, and shown as plain text.
        """
        _, _, ids, dropped, reply_budget = self._request(messages, params)
        kept = kept_messages(messages, dropped)
        sizes = {"dropped": dropped, "context_length": self.info.context_length,
                 "budget": self.prompt_budget(params), "reply_budget": reply_budget}
        if ids is not None:
            return describe_prompt(self.format, kept, ids, exact=self.uses_token_ids, **sizes)
        return _estimated_preview(kept, **sizes)

    async def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[ChatEvent]:
        request_id, started = next(self._ids), time.perf_counter()
        outcome, counts = "rejected", {"prompt": 0, "reply": 0}
        try:
            self.admission.check()  # refuse a flood before spending any work on it
            endpoint, body, ids, dropped, budget = await asyncio.to_thread(self._request, messages, params)
            place = self.admission.join()
        except InvalidRequest as error:
            log.info("request %d: invalid: %s", request_id, error)
            raise
        except BackendBusy as error:
            log.info("request %d: busy: %s", request_id, error)
            raise
        counts["prompt"] = len(ids) if ids is not None else 0
        clamped = budget if budget < params.max_new_tokens else None
        outcome = "cancelled (Stop or disconnect)"  # unless the stream ends here
        try:
            async for position in place.wait():
                yield Queued(position)
            # aclosing: an early close reaches the HTTP response at once, so the server aborts the generation
            async with aclosing(self._stream(endpoint, body, counts, params.stop)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        event = dataclasses.replace(event, dropped_messages=dropped, max_new_tokens_clamped=clamped)
                        outcome = event.reason if event.reason != "error" else f"error ({event.error})"
                    yield event
        except BackendBusy as error:
            outcome = "busy"
            log.info("request %d: busy: %s", request_id, error)
            raise
        finally:
            place.leave()
            log.info("request %d: %s, prompt %d tokens, reply %d tokens, %.2f s (%s)", request_id, outcome,
                     counts["prompt"], counts["reply"], time.perf_counter() - started, self.url)

    async def _stream(self, endpoint: str, body: dict, counts: dict, stop: tuple[str, ...]) -> AsyncIterator[ChatEvent]:
        """POST and turn the server-sent events into TextDelta/Finished; server failures become Finished(error).

        A stop string ends the reply here: the response is closed, so the server stops generating.
        """
        reply = _ReplyText(self.format if self.uses_token_ids else None, stop)
        first = last = None
        reason, usage, answering, failure = None, {}, False, None
        submitted = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=_headers(self.api_key)) as client:
                async with client.stream("POST", self.url + endpoint, json=body) as response:
                    if response.status_code == 429:
                        await response.aread()
                        raise BackendBusy(f"The generation server is busy ({_server_message(response)}); "
                                          "try again in a moment.")
                    if response.status_code != 200:
                        await response.aread()
                        raise _Failure(_status_failure(self.url, response))
                    answering = True
                    async with aclosing(_server_events(response, self.url)) as chunks:
                        async for chunk in chunks:
                            usage = chunk.get("usage") or usage
                            for choice in chunk.get("choices") or []:
                                events, tokens = reply.add(choice)
                                if tokens:
                                    last = time.perf_counter()
                                    first = first or last
                                    counts["reply"] += tokens
                                for event in events:
                                    yield event
                                reason = choice.get("finish_reason") or reason
                            if reply.stopped:
                                break
        except httpx.RequestError as error:
            failure = _transport_failure(self.url, error, answering=answering, read_timeout=self.timeout.read)
        except _Failure as error:
            failure = str(error)
        for event in reply.finish():
            yield event
        if reply.stopped:
            reason = FinishReason.STOP
        elif failure is None and reason not in (FinishReason.STOP, FinishReason.LENGTH):
            failure = f"the generation server at {self.url} ended the reply " + (
                "without saying why" if reason is None else f"early ({reason})")
        if not self.uses_token_ids:  # the server's own counts, when it sends them
            counts["prompt"] = usage.get("prompt_tokens", counts["prompt"])
            counts["reply"] = usage.get("completion_tokens", counts["reply"])
        yield Finished(
            reason=FinishReason.ERROR if failure and not reply.stopped else FinishReason(reason),
            prompt_tokens=counts["prompt"],
            completion_tokens=counts["reply"],
            seconds=(last - first) if first else 0.0,
            time_to_first_token=(first - submitted) if first else 0.0,
            error=None if reply.stopped else failure,
            metadata=reply.metadata,
        )

    async def health(self) -> tuple[bool, str]:
        """(ready, account) for ``GET /healthz``: whether the server answers ``GET /v1/models`` now."""
        try:
            async with httpx.AsyncClient(timeout=5.0, headers=_headers(self.api_key)) as client:
                response = await client.get(self.url + "/v1/models")
        except httpx.RequestError as error:
            return False, _transport_failure(self.url, error, answering=False)
        if response.status_code != 200:
            return False, _status_failure(self.url, response)
        return True, f"the generation server at {self.url} answers (serving {self.served_model})"

    def shutdown(self) -> None:
        """Nothing to stop: each request's connection is closed when it ends (for symmetry with the engine)."""


def _estimated_preview(messages: list[dict], *, dropped: int, context_length: int, budget: int,
                       reply_budget: int) -> PromptPreview:
    """A ``PromptPreview`` without a tokenizer: each message's characters / ``CHARS_PER_TOKEN_ESTIMATE`` (rounded
    up) plus ``MARKER_TOKENS_ESTIMATE``; the text is each role's name on a line of its own, then its content."""
    messages = normalize_messages(messages)
    counts = [math.ceil(len(m["content"]) / CHARS_PER_TOKEN_ESTIMATE) + MARKER_TOKENS_ESTIMATE for m in messages]
    system = counts[0] if messages[0]["role"] == "system" and len(messages) > 1 else 0
    text = "\n\n".join(f"{m['role']}:\n{m['content']}" for m in messages)
    return PromptPreview(total=sum(counts), system=system, history=sum(counts) - system - counts[-1], new=counts[-1],
                         context_length=context_length, budget=budget, reply_budget=reply_budget,
                         dropped_messages=dropped, text=text, exact=False)


def build_remote_backend(settings) -> RemoteBackend:
    """The backend for ``--backend URL``: ``settings.backend``, ``backend_api_key``, the model (when named, else
    the one the server serves) and the request limits of ``Settings``. Raises a StartupError (one line)."""
    return RemoteBackend.connect(
        settings.backend, getattr(settings, "backend_api_key", None),
        model=settings.model if getattr(settings, "model_explicit", True) else None,
        max_input_tokens=settings.max_input_tokens, max_new_tokens=settings.max_new_tokens,
        max_input_chars=getattr(settings, "max_input_chars", None),
        max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)
