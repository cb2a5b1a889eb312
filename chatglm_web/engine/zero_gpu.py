"""ZeroGPU: every reply is one ``@spaces.GPU`` call, streamed token by token.

On ZeroGPU hardware a GPU exists only inside functions decorated with ``@spaces.GPU``; each call
runs in a forked worker process, gets plain (picklable) arguments and yields plain data. So
instead of the batching engine's thread that owns CUDA, ``ZeroGPUEngine`` gives each admitted
request a thread that iterates the decorated generator ``generate_on_gpu``:

    submit -> waiting: QueuePosition each time it changes   (the engine's AdmissionPolicy, then EngineBusy)
           -> one of --max-batch-size slots: generate_on_gpu(...) yields token ids
           -> Token events -> Done(FinishReason)

It has the engine's surface (``protocol.GenerationEngine``) and hands out the engine's
``GenerationRequest`` objects, so the page, the API, stop strings, metrics, Stop, regenerate and undo
work unchanged. Admission, seeds, sampling and when a reply ends follow the engine's own rules
(``admission``, ``sampling.request_seed``, ``request.finish_reason``), so a seeded reply is the
engine's, token for token.

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

import contextvars
import itertools
import logging
import math
import threading

import spaces  # before torch touches CUDA: on ZeroGPU it patches torch (app.py imports it even earlier)
import torch

from chatglm_web.engine.admission import AdmissionPolicy, EngineBusy, WaitingLine
from chatglm_web.engine.events import describe_failure
from chatglm_web.engine.kv_slots import SlotCache
from chatglm_web.engine.request import GenerationRequest, finish_reason
from chatglm_web.engine.sampling import choose_tokens, penalized_ids, request_seed, seeded_generator
from chatglm_web.engine.scheduler import context_length_of
from chatglm_web.engine.step import ModelStep
from chatglm_web.generation import FinishReason, SamplingParams
from chatglm_web.settings import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE

log = logging.getLogger(__name__)

GPU_START_SECONDS = 10  # a worker's start and the weights' move to the GPU, then the prefill
GPU_SECONDS_PER_TOKEN = 0.05  # ChatGLM3-6B decodes 20-35 tokens/s at batch 1 on an H100/H200
GPU_MAX_SECONDS = 120  # the longest call asked for; a reply still running then is cut off by ZeroGPU

#: Models that ``generate_on_gpu`` may run, by key: a model cannot be an argument (arguments are
#: pickled to the worker), but the forked worker inherits this table as it was at start-up.
_models: dict[int, torch.nn.Module] = {}
_keys = itertools.count(1)
_steps: dict[int, ModelStep] = {}  # each model's step, made in the process that runs it
_steps_lock = threading.Lock()


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


def _step_of(model_key: int) -> ModelStep:
    """The model's step in this process (a ZeroGPU worker makes its own, on its GPU): the engine's lean
    forward without fused weights (ZeroGPU moves the weights it knows between processes: they are
    left as they are) and without CUDA graphs (replies of one worker run in threads at once, and a
    captured graph's buffers are one step's)."""
    with _steps_lock:
        if model_key not in _steps:
            _steps[model_key] = ModelStep(_models[model_key], fuse=False, graphs=False)
        return _steps[model_key]


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: list[int]) -> int:
    return choose_tokens(logits.float(), [params], [generator], [penalized_ids(params, seen)])[0]


@spaces.GPU(duration=gpu_seconds)
def generate_on_gpu(model_key: int, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...],
                    max_length: int, seed: int, stop: StopOnCancel):
    """Token ids of one reply, each yielded as soon as it is sampled; the last one ends the reply.

    The engine's step for one request (``step.py``: the prompt's prefill, then one decode step per
    token over a KV slot), sampled as the engine samples a request alone. Ends after a stop token, at
    the reply budget or the context, or when ``stop()`` says the request was cancelled (checked
    before every forward pass).
    """
    step = _step_of(model_key)
    generator = seeded_generator(seed)
    seen = list(prompt_ids)
    if stop():
        return
    with torch.inference_mode():
        prefill = step.new_cache(len(seen))
        logits = step.prefill_chunk(seen, prefill, 0)
        slots = SlotCache()
        slots.add(step.prefilled_kv(prefill, 0, (0, len(seen))))
        del prefill
        for generated in itertools.count(1):
            token = _choose(logits, params, generator, seen)
            seen.append(token)
            yield token
            if finish_reason(token, generated=generated, length=len(seen), params=params, stop_ids=stop_ids,
                             max_length=max_length) or stop():
                return
            logits = step.decode([token], slots, [len(seen) - 1])


class ZeroGPUEngine:
    """At most ``max_batch_size`` concurrent ``generate_on_gpu`` calls, ``max_queue`` requests waiting."""

    def __init__(self, model, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
                 context_length: int | None = None):
        self.model = model
        self.admission = AdmissionPolicy(max_batch_size, max_queue)
        self.context_length = context_length or context_length_of(model)
        self._key = next(_keys)
        _models[self._key] = model
        self._lock = threading.RLock()
        self._waiting = WaitingLine(self.admission)
        self._contexts: dict[int, contextvars.Context] = {}  # request id -> the caller's context, while waiting
        self._running: dict[GenerationRequest, threading.Thread] = {}
        self._stopping = False

    # -- the engine's surface -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=()) -> GenerationRequest:
        # a cancelled waiter leaves the line at once: there is no engine loop to notice it
        request = GenerationRequest(prompt_ids, params, stop_ids, self.context_length, on_cancel=self._dispatch)
        # The caller's context goes with the call: on ZeroGPU, spaces reads the Gradio request from it
        # (the visitor's quota) and the Gradio event (to stop queueing for a GPU when the visitor left).
        context = contextvars.copy_context()
        with self._lock:
            if self._stopping:
                raise EngineBusy("The server is shutting down.")
            self._check_capacity()
            self._contexts[request.id] = context
            self._waiting.append(request)
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
            waiting = self._waiting.clear()
            self._contexts.clear()
            threads = list(self._running.items())
        for request in waiting:
            request.end(FinishReason.ERROR, "the server is shutting down")
        for request, thread in threads:
            request.cancel()
        for _, thread in threads:
            thread.join(timeout=10)
        _models.pop(self._key, None)

    # -- scheduling -----------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        self.admission.check(*self.load)

    def _dispatch(self) -> None:
        """Drop cancelled waiters, start calls for free slots, tell the rest their (changed) positions."""
        with self._lock:
            self._waiting.drop_cancelled()
            if self._stopping:
                return
            for request in self._waiting.take(len(self._running)):
                context = self._contexts.pop(request.id)
                thread = threading.Thread(target=context.run, args=(self._serve, request), daemon=True,
                                          name=f"chatglm-web-zerogpu-{request.id}")
                self._running[request] = thread
                thread.start()
            for request_id in set(self._contexts) - {r.id for r in self._waiting}:
                del self._contexts[request_id]  # dropped while waiting

    def _serve(self, request: GenerationRequest) -> None:
        try:
            self._generate(request)
        except Exception as error:  # the call could not start, failed, or ZeroGPU refused or aborted it
            log.error("GPU call for request %d failed: %s", request.id, describe_failure(error))
            request.end(FinishReason.ERROR, _explain(error))
        finally:
            with self._lock:
                self._running.pop(request, None)
                self._dispatch()

    def _generate(self, request: GenerationRequest) -> None:
        """Stream one GPU call's tokens as the request's events; close the call as soon as it is not needed."""
        if request.cancelled:
            request.end(FinishReason.CANCELLED)
            return
        params, stop_ids = request.params, tuple(sorted(request.stop_ids))
        tokens = generate_on_gpu(self._key, request.prompt_ids, params, stop_ids, request.max_length,
                                 request_seed(params), StopOnCancel(request.cancel_event))
        reason = None
        try:
            for generated, token in enumerate(tokens, start=1):
                if request.cancelled:
                    break
                reason = request.finish_reason(token, generated=generated,
                                               length=len(request.prompt_ids) + generated)
                if reason != FinishReason.STOP:  # a stop token is not shown
                    request.token(token)
                if reason:
                    break
        finally:
            tokens.close()  # ends the call now; on ZeroGPU: spaces sets the worker's stop event
        if reason:
            request.end(reason)
        elif request.cancelled:
            request.end(FinishReason.CANCELLED)
        else:
            request.end(FinishReason.ERROR, "the GPU call ended before the reply did")


def _explain(error: Exception) -> str:
    """A failed call for the user: ZeroGPU's own message (quota, no GPU, aborted) when it gave one."""
    message = getattr(error, "message", None)  # gradio.Error, which spaces raises
    return str(message) if message else describe_failure(error)
