"""The app's own OpenAI-compatible API, on the page's port and served by the same backend and queue.

    GET  /v1/models             the one model
    POST /v1/chat/completions   streamed (SSE) or not; temperature, top_p, max_tokens, seed, stop,
                                plus top_k and repetition_penalty; ``usage`` in the reply; ``tools``
                                and ``tool_choice`` ("auto" / "none"): see ``tool_calls``; documents as
                                user messages' ``file`` parts, reported in a ``documents`` field: see
                                ``documents``
    GET  /healthz               200 when the model is loaded (or the backend reachable) and the engine alive
    GET  /metrics               Prometheus text format

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input,
401 without valid credentials, 429 when the server is busy or a client failed to log in too often
(``http_guard.LoginThrottle``), 500 when generation fails. With ``--api-key`` a request needs
``Authorization: Bearer <key>``; with ``--auth user:pass`` the same login as the page works as HTTP
Basic credentials. ``/healthz`` needs neither.

A request body is at most ``http_guard.body_limit()`` bytes (``HttpGuard`` answers 413 before reading
more), of RFC 8259 JSON at most ``strict_json.MAX_JSON_DEPTH`` levels deep, with at most
``MAX_MESSAGES`` messages. It is parsed, validated and converted in a worker thread: a large one
never holds up the event loop (``/healthz``, other requests' streams). A request without
``max_tokens`` / ``max_completion_tokens`` gets ``SamplingParams``' default, at most the server's
``--max-new-tokens``.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from chatglm_web.api import strict_json
from chatglm_web.api.documents import attach_documents
from chatglm_web.api.tool_calls import ReplyParts, ToolCallIn, ToolSpec, check_tool_choice, model_messages, tool_calls_out
from chatglm_web.generation import BackendBusy, Finished, FinishReason, InvalidRequest, SamplingParams, TextDelta
from chatglm_web.api.http_guard import Credentials, HttpGuard, LoginThrottle, body_limit

#: The API's finish_reason for each of ours (an error is answered as an error, not a finish reason).
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop"}
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingParams option -> the API's name for it
MAX_MESSAGES = 2048  # messages in one request


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields this server understands; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict | None = None

    def sampling_params(self, max_new_tokens_limit: int | None = None) -> SamplingParams:
        """The request's sampling options; without max_tokens, the default reply length, at most the server's."""
        max_new_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_new_tokens is None and max_new_tokens_limit:
            max_new_tokens = min(SamplingParams.model_fields["max_new_tokens"].default, max_new_tokens_limit)
        values = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "max_new_tokens": max_new_tokens,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}
        if self.stop is not None:
            values["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams.from_form(**{k: v for k, v in values.items() if v is not None})


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def api_app_kwargs(backend, *, metrics, api_key: str | None = None, auth: tuple[str, str] | None = None) -> dict:
    """FastAPI arguments (``page.launch(app_kwargs=...)``) that put the API's routes before Gradio's, answer
    ``APIError`` in OpenAI's shape, and put ``http_guard.HttpGuard`` in front of every route: the body limit,
    the login (``auth``), no uploads, and failed logins throttled, the page's and the API's in one
    ``LoginThrottle``."""
    throttle = LoginThrottle() if api_key or auth else None
    guard = Middleware(HttpGuard, max_body_bytes=body_limit(backend.max_input_chars), login_required=bool(auth),
                       throttle=throttle, credentials=Credentials(api_key, auth, throttle))
    return {"routes": api_routes(backend, metrics=metrics, api_key=api_key, auth=auth, throttle=throttle),
            "exception_handlers": {APIError: _error_response}, "middleware": [guard]}


async def _error_response(request: Request, error: APIError) -> JSONResponse:
    return error.response()


def api_routes(backend, *, metrics, api_key: str | None = None, auth: tuple[str, str] | None = None,
               throttle: LoginThrottle | None = None) -> list:
    """The FastAPI routes of the API; an ``APIError`` they raise needs ``api_app_kwargs``' handler."""
    router = APIRouter()
    model_id = backend.info.name
    max_new_tokens = getattr(backend, "max_new_tokens", None)  # the server's --max-new-tokens

    credentials = Credentials(api_key, auth, throttle)

    def authorize(request: Request) -> None:
        """Let the request through or raise 401; wrong credentials count as a failed login of the client."""
        problem = credentials.problem(request.headers.get("authorization", ""),
                                      request.client.host if request.client else "unknown", "This API")
        if problem is not None:
            raise APIError(problem["status"], problem["message"], kind=problem["kind"], code=problem["code"],
                           headers=problem["headers"])

    @router.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": 0, "owned_by": "chatglm-web",
            "max_model_len": backend.info.context_length}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await request.body()  # at most http_guard.body_limit() bytes: HttpGuard stops a longer one
        chat, params, tools, messages = await run_in_threadpool(parse_chat_request, raw, max_new_tokens,
                                                                model_id if not backend.info.tools else None)
        try:
            attached = await attach_documents(backend, chat.messages, tools, params)
        except (InvalidRequest, BackendBusy) as error:
            raise _request_error(error) from None
        extra = {}
        if attached is not None:
            messages, extra = attached.messages, {"documents": attached.report}
        stream = backend.stream_chat(messages, params)
        first = await _first_event(stream)  # bad input or busy is an HTTP error, not a broken stream
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(_sse(stream, first, completion_id, model_id, include_usage, bool(tools), extra),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(stream, first, completion_id, model_id, bool(tools), extra)

    @router.get("/healthz")
    async def healthz():
        ready, detail = await backend.health()
        return JSONResponse({"status": "ok" if ready else "unavailable", "model": model_id, "detail": detail},
                            status_code=200 if ready else 503)

    @router.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return list(router.routes)


def parse_chat_request(raw: bytes, max_new_tokens: int | None = None, no_tools_model: str | None = None):
    """A ``/v1/chat/completions`` body -> (request, SamplingParams, tools, the model's messages); ``APIError`` 400
    for anything the API does not take. ``no_tools_model``: the name of the served model when its family has no
    tool-call dialect (``ModelInfo.tools`` false): then ``tools`` and tool messages are refused, never written
    into its prompt in another family's format. CPU work proportional to the body: run it off the event loop."""
    try:
        body = strict_json.parse(raw)
    except ValueError as error:
        raise APIError(400, f"The request body is not valid JSON: {error}") from None
    if isinstance(body, dict) and isinstance(body.get("messages"), list) and len(body["messages"]) > MAX_MESSAGES:
        raise APIError(400, f"messages: at most {MAX_MESSAGES:,} messages are taken, got {len(body['messages']):,}",
                       param="messages")
    try:
        strict_json.check_depth(body)
    except ValueError as error:
        raise APIError(400, f"The request body is not valid here: {error}") from None
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        raise APIError(400, _first_problem(error), param=_first_param(error)) from None
    if chat.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    try:
        params = chat.sampling_params(max_new_tokens)
    except InvalidRequest as error:
        raise APIError(400, _api_wording(str(error)), param=API_NAMES.get(error.param, error.param)) from None
    if no_tools_model is not None:
        used = "tools" if chat.tools else next(
            (f"messages[{i}]" for i, m in enumerate(chat.messages)
             if m.role == "tool" or getattr(m, "tool_calls", None)), None)
        if used is not None:
            raise APIError(400, f"{no_tools_model} cannot call tools: send no tools, tool calls or tool results.",
                           param=used)
    try:
        tools = check_tool_choice(chat.tools, chat.tool_choice)
        messages = model_messages([m.model_dump() for m in chat.messages], tools)
    except InvalidRequest as error:
        raise APIError(400, str(error), param=error.param) from None
    return chat, params, tools, messages


def _first_param(error: ValidationError) -> str | None:
    loc = error.errors(include_url=False)[0]["loc"]
    return ".".join(str(x) for x in loc) or None


def _first_problem(error: ValidationError) -> str:
    item = error.errors(include_url=False)[0]
    where = ".".join(str(x) for x in item["loc"])
    return f"{where}: {item['msg']}" if where else item["msg"]


async def _first_event(stream):
    """The stream's first event; InvalidRequest/BackendBusy become API errors (nothing was sent yet)."""
    try:
        return await anext(stream)
    except (InvalidRequest, BackendBusy) as error:
        await stream.aclose()
        raise _request_error(error) from None
    except StopAsyncIteration:
        raise APIError(500, "the backend ended without a reply", kind="server_error") from None


def _request_error(error: InvalidRequest | BackendBusy) -> APIError:
    """A request refused before anything was sent: 400 for bad input, 429 when busy."""
    if isinstance(error, BackendBusy):
        return APIError(429, str(error), kind="server_busy", code="server_busy")
    return APIError(400, _api_wording(str(error)), param=API_NAMES.get(error.param, error.param))


def _api_wording(message: str) -> str:
    for option, name in API_NAMES.items():
        message = message.replace(option, name)
    return message


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _events(stream, first):
    async with aclosing(stream):
        yield first
        async for event in stream:
            yield event


async def _complete(stream, first, completion_id: str, model_id: str, tools: bool, extra: dict) -> JSONResponse:
    reply, done = ReplyParts(), None
    async for event in _events(stream, first):
        reply.add(event)
        if isinstance(event, Finished):
            done = event
    if done is None or done.reason == "error":
        error = done.error if done else "the reply ended early"
        return APIError(500, f"Generation failed: {error}", kind="server_error").response()
    message = {"role": "assistant", "content": reply.text}
    finish_reason = FINISH_REASONS.get(done.reason, "stop")
    calls = tool_calls_out(reply) if tools and done.reason == "stop" else None
    if calls:
        message = {"role": "assistant", "content": reply.answer_text or None, "tool_calls": calls}
        finish_reason = "tool_calls"
    return JSONResponse({
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": _usage(done), **extra,
    })


async def _sse(stream, first, completion_id: str, model_id: str, include_usage: bool, tools: bool = False,
               extra: dict | None = None):
    """Server-sent events in OpenAI's chunk format; a client that goes away cancels the generation. The first
    chunk also carries ``extra`` (the request's ``documents``).

    With ``tools``, the text of an assistant message that is a call (a metadata line came first) is held
    back and sent at the end as one ``tool_calls`` delta (finish reason ``tool_calls``)."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, **(extra or {}))
    reply = ReplyParts()
    async for event in _events(stream, first):
        reply.add(event)
        if isinstance(event, TextDelta) and not (tools and reply.in_call):
            yield chunk({"content": event.text})
        elif isinstance(event, Finished):
            if event.reason == "error":
                error = APIError(500, f"Generation failed: {event.error}", kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            calls = tool_calls_out(reply) if tools and event.reason == "stop" else None
            if calls:
                yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                yield chunk({}, "tool_calls")
            else:
                if tools and reply.in_call:  # a call that cannot be parsed (or was cut off): shown as text
                    yield chunk({"content": reply.parts[-1]["content"]})
                yield chunk({}, FINISH_REASONS.get(event.reason, "stop"))
            if include_usage:
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": model_id, "choices": [], "usage": _usage(event)}
                yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
