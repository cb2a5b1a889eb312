"""ZeroGPU: every reply is one ``@spaces.GPU`` call, streamed token by token.

On ZeroGPU hardware a GPU exists only inside functions decorated with ``@spaces.GPU``; each call
runs in a forked worker process, gets plain (picklable) arguments and yields plain data. So
instead of the batching engine's thread that owns CUDA, ``ZeroGPUEngine`` gives each admitted
request a thread that iterates the decorated generator ``generate_on_gpu``:

    submit -> waiting: ("queued", position) each time it changes   (--max-queue, then EngineBusy)
           -> one of --max-batch-size slots: generate_on_gpu(...) yields token ids
           -> ("token", id) events -> ("done", Outcome)

It has the surface ``LocalBackend`` uses (``submit``, ``check_capacity``, ``load``, ``alive``,
``finished``, ``shutdown``) and hands out the engine's ``GenerationRequest`` objects, so the page,
the API, stop strings, metrics, Stop, regenerate and undo work unchanged. Seeds, sampling and
when a reply ends follow the engine's own rules (``engine.request_seed``, ``finish_reason``, ...),
so a seeded reply is the engine's, token for token.

Stop: cancelling a request closes the decorated generator at its next token. On ZeroGPU that
sets the worker's stop event (``spaces`` then closes the generator in the worker); in-process
the generator's stopping criterion, ``StopOnCancel``, ends it before the next forward pass.
Either way no GPU time goes to a reply nobody reads.

GPU time asked for each call: ``gpu_seconds``, the ``duration`` callable (same arguments as the
function): ``GPU_START_SECONDS`` plus ``GPU_SECONDS_PER_TOKEN`` for each token of the reply
budget, at most ``GPU_MAX_SECONDS``. ZeroGPU starts a call only when the visitor has that much
quota left, and aborts it when it runs longer.

Off ZeroGPU, ``spaces.GPU`` returns the function unchanged: the same path runs in this process
on any device (``--zero-gpu`` on a CPU is how the tests run it).
"""

from __future__ import annotations

import collections
import contextvars
import itertools
import logging
import math
import threading

import spaces  # before torch touches CUDA: on ZeroGPU it patches torch (app.py imports it even earlier)
import torch
from transformers import DynamicCache

from chatglm_web.engine.scheduler import (EngineBusy, GenerationRequest, check_engine_capacity, describe_failure, finish_reason,
                     penalized_ids, request_seed, seeded_generator)
from chatglm_web.generation import SamplingParams
from chatglm_web.engine.sampling import choose_tokens

log = logging.getLogger(__name__)

GPU_START_SECONDS = 10  # a worker's start and the weights' move to the GPU, then the prefill
GPU_SECONDS_PER_TOKEN = 0.05  # ChatGLM3-6B decodes 20-35 tokens/s at batch 1 on an H100/H200
GPU_MAX_SECONDS = 120  # the longest call asked for; a reply still running then is cut off by ZeroGPU

#: Models that ``generate_on_gpu`` may run, by key: a model cannot be an argument (arguments are
#: pickled to the worker), but the forked worker inherits this table as it was at start-up.
_models: dict[int, torch.nn.Module] = {}
_keys = itertools.count(1)


class StopOnCancel:
    """Stopping criterion of one GPU call: true once the request was cancelled (Stop, disconnect).

    Sent to a ZeroGPU worker it arrives as a fresh, never-set criterion (a thread event cannot
    cross processes); there ``spaces``' own stop event ends the call when the caller closes it.
    """

    def __init__(self, event: threading.Event | None = None):
        self._event = event or threading.Event()

    def __call__(self) -> bool:
        return self._event.is_set()

    def __reduce__(self):
        return StopOnCancel, ()


def gpu_seconds(model_key: int, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...],
                max_length: int, seed: int, stop: StopOnCancel) -> int:
    """ZeroGPU ``duration`` of one reply: start-up plus a per-token allowance for its budget, capped."""
    budget = max(1, min(params.max_new_tokens, max_length - len(prompt_ids)))
    return min(GPU_MAX_SECONDS, math.ceil(GPU_START_SECONDS + GPU_SECONDS_PER_TOKEN * budget))


@torch.inference_mode()
def _next_token(model, input_ids: torch.Tensor, cache: DynamicCache, params: SamplingParams,
                generator: torch.Generator, seen: list[int]) -> int:
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    return choose_tokens(logits, [params], [generator], [penalized_ids(params, seen, logits.device)])[0]


@spaces.GPU(duration=gpu_seconds)
def generate_on_gpu(model_key: int, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...],
                    max_length: int, seed: int, stop: StopOnCancel):
    """Token ids of one reply, each yielded as soon as it is sampled; the last one ends the reply.

    A plain cached decode (prefill, then one token per step), sampled as the engine samples a
    request alone. Ends after a stop token, at the reply budget or the context, or when
    ``stop()`` says the request was cancelled (checked before every forward pass).
    """
    model = _models[model_key]
    device = next(model.parameters()).device
    generator = seeded_generator(seed)
    cache = DynamicCache(config=model.config)
    seen = list(prompt_ids)
    input_ids = torch.tensor([seen], device=device)
    for generated in itertools.count(1):
        if stop():
            return
        token = _next_token(model, input_ids, cache, params, generator, seen)
        seen.append(token)
        yield token
        if finish_reason(token, generated=generated, length=len(seen), params=params, stop_ids=stop_ids,
                         max_length=max_length):
            return
        input_ids = torch.tensor([[token]], device=device)


class _Request(GenerationRequest):
    """A request whose cancellation also frees its queue place at once (there is no engine loop to notice)."""

    def __init__(self, *args, on_cancel):
        super().__init__(*args)
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        if not self.cancelled:
            super().cancel()
            self._on_cancel()


class ZeroGPUEngine:
    """At most ``max_batch_size`` concurrent ``generate_on_gpu`` calls, ``max_queue`` requests waiting."""

    def __init__(self, model, *, max_batch_size: int = 8, max_queue: int = 32, context_length: int | None = None):
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue = max(0, max_queue)
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", 4096)
        self._key = next(_keys)
        _models[self._key] = model
        self._lock = threading.RLock()
        self._waiting: collections.deque[tuple[_Request, contextvars.Context]] = collections.deque()
        self._running: dict[_Request, threading.Thread] = {}
        self._stopping = False
        self.calls = 0  # GPU calls made, for tests
        self.finished = collections.Counter()  # reason -> count

    # -- the surface LocalBackend uses ----------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=()) -> GenerationRequest:
        if not prompt_ids:
            raise ValueError("empty prompt")
        request = _Request(prompt_ids, params, set(stop_ids), self.context_length, on_cancel=self._dispatch)
        request._on_done = lambda outcome: self.finished.update([outcome.reason])
        # The caller's context goes with the call: on ZeroGPU, spaces reads the Gradio request from it
        # (the visitor's quota) and the Gradio event (to stop queueing for a GPU when the visitor left).
        context = contextvars.copy_context()
        with self._lock:
            if self._stopping:
                raise EngineBusy("The server is shutting down.")
            self._check_capacity()
            self._waiting.append((request, context))
            self._dispatch()
        return request

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting): GPU calls in flight, and requests waiting for one."""
        return len(self._running), len(self._waiting)

    @property
    def alive(self) -> bool:
        return not self._stopping

    def check_capacity(self) -> None:
        """Raise ``EngineBusy`` if a submit now would be refused (a cheap early check)."""
        with self._lock:
            self._check_capacity()

    def shutdown(self) -> None:
        """Refuse new requests, end the waiting ones, stop the running calls at their next token."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            threads = list(self._running.items())
        for request, _ in waiting:
            request._end("error", "the server is shutting down")
        for request, thread in threads:
            request.cancel()
        for _, thread in threads:
            thread.join(timeout=10)
        _models.pop(self._key, None)

    # -- scheduling -----------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        check_engine_capacity(*self.load, self.max_batch_size, self.max_queue)

    def _dispatch(self) -> None:
        """Drop cancelled waiters, start calls for free slots, tell the rest their (changed) positions."""
        with self._lock:
            for entry in [e for e in self._waiting if e[0].cancelled]:
                self._waiting.remove(entry)
                entry[0]._end("cancelled")
            while self._waiting and len(self._running) < self.max_batch_size and not self._stopping:
                request, context = self._waiting.popleft()
                thread = threading.Thread(target=context.run, args=(self._serve, request), daemon=True,
                                          name=f"chatglm-web-zerogpu-{request.id}")
                self._running[request] = thread
                thread.start()
            for position, (request, _) in enumerate(self._waiting, start=1):
                request._queued_at(position)

    def _serve(self, request: _Request) -> None:
        try:
            self._generate(request)
        except Exception as error:  # the call could not start, failed, or ZeroGPU refused or aborted it
            log.error("GPU call for request %d failed: %s", request.id, describe_failure(error))
            request._end("error", _explain(error))
        finally:
            with self._lock:
                self._running.pop(request, None)
                self._dispatch()

    def _generate(self, request: _Request) -> None:
        """Stream one GPU call's tokens as the request's events; close the call as soon as it is not needed."""
        if request.cancelled:
            request._end("cancelled")
            return
        with self._lock:
            self.calls += 1
        params, stop_ids, max_length = request.params, tuple(sorted(request.stop_ids)), request.max_length
        tokens = generate_on_gpu(self._key, request.prompt_ids, params, stop_ids, max_length,
                                 request_seed(params), StopOnCancel(request._cancelled))
        reason = None
        try:
            for generated, token in enumerate(tokens, start=1):
                if request.cancelled:
                    break
                reason = finish_reason(token, generated=generated, length=len(request.prompt_ids) + generated,
                                       params=params, stop_ids=stop_ids, max_length=max_length)
                if reason != "stop":  # a stop token is not shown
                    request._emit("token", token)
                if reason:
                    break
        finally:
            tokens.close()  # ends the call now; on ZeroGPU: spaces sets the worker's stop event
        if reason:
            request._end(reason)
        elif request.cancelled:
            request._end("cancelled")
        else:
            request._end("error", "the GPU call ended before the reply did")


def _explain(error: Exception) -> str:
    """A failed call for the user: ZeroGPU's own message (quota, no GPU, aborted) when it gave one."""
    message = getattr(error, "message", None)  # gradio.Error, which spaces raises
    return str(message) if message else describe_failure(error)
