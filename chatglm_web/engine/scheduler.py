"""The generation engine: one worker thread owns the model and serves every request in one batch.

    request = engine.submit(prompt_ids, params, stop_ids)   # EngineBusy when the queue is full
    for event in request: ...                                # or: async for event in request
    request.cancel()                                         # frees its slot within one step

Events are ``("queued", position)`` (sent when the position changes), ``("token", id)`` and,
last, ``("done", Outcome)``: why it ended (``stop`` | ``length`` | ``cancelled`` | ``error``) and,
for an error, what went wrong.

Limits: at most ``max_batch_size`` requests run and at most ``max_queue`` wait; a submit beyond
that raises ``EngineBusy`` at once. A request whose prefill fails (say, out of memory on one long
prompt) ends with an error alone; the running replies go on.

Continuous batching: a new request is prefilled apart from the running batch (only the last
position's logits; the whole prompts of requests admitted together in one left-padded forward),
then its keys and values join the running batch; every decode step advances all
running requests by one token. Prefill is chunked: each turn of the loop prefills at most
``prefill_chunk`` prompt tokens (of one or several new requests) and then runs one decode step,
so a long prompt arriving while others stream delays their next token by one chunk at most,
not by its whole prefill. The running batch's keys and values live in a ``SlotCache``
(``batch_cache.py``): a preallocated slot per request, each writing its new token at its own
position, read through a boolean mask; a finished or cancelled request's slot is freed at once and
an idle engine holds no cache, so memory follows the live requests and nothing accumulates between
turns.

Each request samples with its own settings and its own seeded ``torch.Generator``.

The rules every generator of this app shares (``zero_gpu.py`` too) are module functions here:
``request_seed`` / ``seeded_generator``, ``penalized_ids``, ``finish_reason``,
``check_engine_capacity`` and ``describe_failure``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from chatglm_web.engine.kv_slots import SlotCache, prefilled_kv
from chatglm_web.generation import BackendBusy, SamplingParams
from chatglm_web.engine.sampling import choose_tokens

log = logging.getLogger(__name__)

_DONE = "done"


class EngineBusy(BackendBusy):
    pass


@dataclass(frozen=True)
class Outcome:
    """How a request ended: ``reason`` is stop | length | cancelled | error; ``error`` says what failed."""

    reason: str
    error: str | None = None


class GenerationRequest:
    """A handle on one submitted generation; iterate it (sync or async) for its events."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int], max_length: int,
                 on_event=None):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = set(stop_ids)
        self.max_length = max_length
        self.submitted_at = time.perf_counter()
        self._cancelled = threading.Event()
        self._finished = False
        try:
            self._loop = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async_queue = None, None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._on_done = None
        self._on_event = on_event  # (kind, value) -> None: events go there instead of to an iterator
        self._position: int | None = None  # last queue position sent

    # -- consumer side -------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if event[0] == _DONE:
                return

    async def __aiter__(self):
        async for events in self.batches():
            for event in events:
                yield event

    async def batches(self):
        """Lists of events: each waits for one, then takes all that already arrived.

        A consumer slower than the decode loop (a busy server) then handles several tokens
        per wake-up instead of falling further behind.
        """
        if self._async_queue is None:
            raise RuntimeError("submit() the request from the event loop that iterates it")
        try:
            while True:
                events = [await self._async_queue.get()]
                while not self._async_queue.empty():
                    events.append(self._async_queue.get_nowait())
                yield events
                if events[-1][0] == _DONE:
                    return
        finally:
            self.cancel()  # no-op when finished; frees the slot when the consumer went away

    # -- engine side ---------------------------------------------------------------------
    def _queued_at(self, position: int) -> None:
        """Tell the consumer its queue position, once per change."""
        if position != self._position:
            self._position = position
            self._emit("queued", position)

    def _end(self, reason: str, error: str | None = None) -> None:
        self._emit(_DONE, Outcome(reason, error))

    def _emit(self, kind: str, value) -> None:
        if self._finished:
            return
        self._finished = kind == _DONE
        if self._finished and self._on_done:
            self._on_done(value)
        if self._on_event is not None:
            self._on_event(kind, value)
            return
        if self._async_queue is None:
            self._queue.put((kind, value))
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, (kind, value))
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening
            self.cancel()


class _Row:
    """A running request inside the batch."""

    def __init__(self, request: GenerationRequest, first_token: int, generator: torch.Generator):
        self.request = request
        self.generator = generator
        self.seen = list(request.prompt_ids) + [first_token]
        self.generated = 1
        self.length = len(self.seen)  # real tokens in this row's sequence

    @property
    def last_token(self) -> int:
        return self.seen[-1]


def request_seed(params: SamplingParams) -> int:
    """The request's seed: its own, or a random one when it has none."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def seeded_generator(seed: int) -> torch.Generator:
    """The request's own random generator (on the CPU, so a seed draws the same on any device)."""
    return torch.Generator(device="cpu").manual_seed(seed)


def penalized_ids(params: SamplingParams, seen: list[int], device) -> torch.Tensor | None:
    """The ids a repetition penalty applies to (None when there is no penalty: no tensor built)."""
    if params.repetition_penalty == 1.0:
        return None
    return torch.tensor(seen, device=device)


def finish_reason(token: int, *, generated: int, length: int, params: SamplingParams, stop_ids,
                  max_length: int) -> str | None:
    """Why a reply ends with ``token``, its ``generated``-th token, at sequence ``length``: None to go on.

    ``stop``: a stop token (not shown); ``length``: the last token of the reply budget or the
    context (shown).
    """
    if token in stop_ids:
        return "stop"
    if generated >= params.max_new_tokens or length >= max_length:
        return "length"
    return None


def split_load(accepted: int, max_batch_size: int) -> tuple[int, int]:
    """(running, waiting) of ``accepted`` unfinished requests: the first ``max_batch_size`` count as running."""
    running = min(accepted, max_batch_size)
    return running, accepted - running


def check_engine_capacity(running: int, waiting: int, max_batch_size: int, max_queue: int) -> None:
    """Raise ``EngineBusy`` when ``running`` + ``waiting`` requests fill every slot and queue place."""
    if running + waiting >= max_batch_size + max_queue:
        raise EngineBusy(
            f"The server is busy: {running} replies are being written and {waiting} are waiting, "
            f"which is all it takes at once. Please try again in a moment."
        )


class _Prefill:
    """A request whose prompt is being prefilled, chunk by chunk, into its own cache."""

    def __init__(self, request: GenerationRequest, config):
        self.request = request
        self.cache = DynamicCache(config=config)
        self.done = 0  # prompt tokens already in the cache

    @property
    def remaining(self) -> int:
        return len(self.request.prompt_ids) - self.done


DEFAULT_PREFILL_CHUNK = 512


class Engine:
    def __init__(self, model, *, max_batch_size: int = 8, max_queue: int = 32, context_length: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, own_thread: bool = True):
        """``own_thread=False``: the loop runs where ``run()`` is called (the main thread of the engine
        process: oneDNN's CPU kernels run markedly faster there than in a thread started later)."""
        self.model = model
        self._own_thread = own_thread
        self.prefill_chunk = max(1, prefill_chunk)
        self.device = next(model.parameters()).device
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue = max(0, max_queue)
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", 4096)
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._rows: list[_Row] = []
        self._admitting: list[GenerationRequest] = []  # taken from the queue, prefill not yet done
        self._prefills: dict[int, _Prefill] = {}  # request id -> its prefill in progress (worker thread only)
        self._cache: SlotCache | None = None  # the running batch's KV cache (batch_cache.py)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and benchmarks
        self.prefills = 0  # prefill forwards run (several requests may share one)
        self.max_batch_seen = 0
        self.finished = collections.Counter()  # reason -> count

    # -- public ----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=(), on_event=None) -> GenerationRequest:
        """Queue a generation. ``on_event(kind, value)``, when given, receives the events (called from the
        engine's thread) instead of the returned request's iterators."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        request = GenerationRequest(prompt_ids, params, set(stop_ids), self.context_length, on_event)
        request._on_done = lambda outcome: self.finished.update([outcome.reason])
        with self._wake:
            self._check_capacity()
            self._waiting.append(request)
            self._ensure_thread()
            self._wake.notify()
        return request

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting): requests generating, and requests waiting for a slot."""
        return split_load(len(self._rows) + len(self._admitting) + len(self._waiting), self.max_batch_size)

    @property
    def alive(self) -> bool:
        """The worker is running or can start on the next submit (not shut down, not crashed)."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    def check_capacity(self) -> None:
        """Raise ``EngineBusy`` if a submit now would be refused (a cheap early check)."""
        with self._wake:
            self._check_capacity()

    def _check_capacity(self) -> None:
        check_engine_capacity(*self.load, self.max_batch_size, self.max_queue)

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=10)

    # -- worker ----------------------------------------------------------------------------
    def run(self) -> None:
        """Run the decode loop in the calling thread until ``shutdown()`` (with ``own_thread=False``)."""
        self._run()

    def _ensure_thread(self) -> None:
        if not self._own_thread:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="chatglm-web-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._admitting and not self._rows:
                    self._wake.wait()
                if self._stopping:
                    break
                for request in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(request)
                    request._end("cancelled")
                while self._waiting and len(self._rows) + len(self._admitting) < self.max_batch_size:
                    self._admitting.append(self._waiting.popleft())
                for position, request in enumerate(self._waiting, start=1):
                    request._queued_at(position)
            with torch.inference_mode():
                self._prefill_some()
                if self._rows:
                    try:
                        self._decode_step()
                    except Exception as error:  # the shared batch is unusable: fail its rows, keep serving
                        log.exception("decode step failed")
                        self._fail_running(error)
        self._fail_running(RuntimeError("the engine stopped"), self._admitting + list(self._waiting))

    def _fail_running(self, error: Exception, extra: list[GenerationRequest] = ()) -> None:
        for request in [row.request for row in self._rows] + list(extra):
            request._end("error", describe_failure(error))
        self._rows, self._cache = [], None
        self._release_memory()

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prefill_some(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens of the admitted requests, oldest first.

        Whole prompts of requests admitted together go through the model in one forward (left-padded,
        as long as the padded batch fits the budget); a longer prompt is prefilled chunk by chunk. A
        request whose prompt is complete gets its first token and joins the batch; one whose prefill
        fails ends with the error alone (the batch goes on).
        """
        budget = self.prefill_chunk
        group = self._whole_prompts(budget)
        if len(group) > 1:
            try:
                self._prefill_together(group)
                budget -= len(group) * max(len(r.prompt_ids) for r in group)
            except Exception as error:  # one by one below, where a failure is only its own request's
                log.warning("prefill of %d requests together failed (%s: %s); one by one", len(group),
                            type(error).__name__, error)
                self._release_memory()
        while budget > 0 and self._admitting:
            request = self._admitting[0]
            prefill = self._prefills.get(request.id)
            if prefill is None:
                prefill = self._prefills[request.id] = _Prefill(request, self.model.config)
            try:
                if request.cancelled:
                    request._end("cancelled")
                else:
                    size = min(budget, prefill.remaining)
                    budget -= size
                    logits = self._prefill_chunk(prefill, size)
                    if prefill.remaining:
                        continue  # more chunks of this prompt in the next turns
                    self._admit(request, prefilled_kv(prefill.cache), logits)
            except Exception as error:  # this request alone fails; the batch goes on
                self._prefill_failed(request, error)
            self._prefills.pop(request.id, None)
            self._admitted(request)

    def _whole_prompts(self, budget: int) -> list[GenerationRequest]:
        """The first admitted requests whose whole prompts, left-padded to the longest, fit ``budget``."""
        group: list[GenerationRequest] = []
        for request in self._admitting:
            width = max([len(request.prompt_ids)] + [len(r.prompt_ids) for r in group])
            if request.id in self._prefills or request.cancelled or (len(group) + 1) * width > budget:
                break
            group.append(request)
        return group

    def _prefill_together(self, group: list[GenerationRequest]) -> None:
        """One forward for several whole prompts; each request then gets its first token and its slot."""
        lengths = [len(r.prompt_ids) for r in group]
        width = max(lengths)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for i, request in enumerate(group):
            ids[i, width - lengths[i]:] = torch.tensor(request.prompt_ids, device=self.device)
            mask[i, width - lengths[i]:] = 1
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         cache=cache, use_cache=True, logits_to_keep=1)
        self.prefills += 1
        for i, request in enumerate(group):
            try:
                self._admit(request, prefilled_kv(cache, i, width - lengths[i]), out.logits[i:i + 1, -1])
            except Exception as error:
                self._prefill_failed(request, error)
            self._admitted(request)

    def _prefill_failed(self, request: GenerationRequest, error: Exception) -> None:
        log.error("prefill of request %d (%d prompt tokens) failed: %s: %s", request.id,
                  len(request.prompt_ids), type(error).__name__, error)
        request._end("error", describe_failure(error))
        self._release_memory()

    def _prefill_chunk(self, prefill: _Prefill, size: int) -> torch.Tensor:
        """Run the next ``size`` prompt tokens into the request's cache; the last position's logits."""
        ids = torch.tensor([prefill.request.prompt_ids[prefill.done:prefill.done + size]], device=self.device)
        out = self.model(input_ids=ids, cache=prefill.cache, use_cache=True, logits_to_keep=1)
        self.prefills += 1
        prefill.done += size
        return out.logits[:, -1]

    def _admit(self, request: GenerationRequest, kv: list, logits: torch.Tensor) -> None:
        """Choose the first token of a prefilled request and join its cache to the batch."""
        generator = seeded_generator(request_seed(request.params))
        seen = penalized_ids(request.params, request.prompt_ids, self.device)
        token = choose_tokens(logits.float(), [request.params], [generator], [seen])[0]
        row = _Row(request, token, generator)
        reason = self._finish_reason(row, token)
        if reason:
            request._end(reason)
            return
        request._emit("token", token)
        self._join(row, kv)

    def _join(self, row: _Row, kv: list) -> None:
        """Copy the prefilled keys and values into a slot of the batch (a failure leaves the running batch as it was)."""
        batch = self._cache or SlotCache()
        batch.add(kv)
        self._cache = batch
        self._admitted(row.request, row)

    def _admitted(self, request: GenerationRequest, row: _Row | None = None) -> None:
        """Move a request out of admission: into the batch (``row``), or out (done / failed)."""
        with self._wake:
            if row is not None:
                self._rows.append(row)
            if request in self._admitting:
                self._admitting.remove(request)

    def _decode_step(self) -> None:
        rows = self._rows
        input_ids = torch.tensor([[row.last_token] for row in rows], device=self.device)
        inputs = self._cache.step_inputs([row.length - 1 for row in rows])  # the last token is not cached yet
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **inputs)
        logits = out.logits[:, -1].float()
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        live = [i for i, row in enumerate(rows) if not row.request.cancelled]
        tokens = dict(zip(live, choose_tokens(
            logits[live], [rows[i].request.params for i in live], [rows[i].generator for i in live],
            [penalized_ids(rows[i].request.params, rows[i].seen, self.device) for i in live])))
        keep, done = [], []
        for i, row in enumerate(rows):
            if i not in tokens:
                done.append((row.request, "cancelled"))
                continue
            token = tokens[i]
            row.seen.append(token)
            row.generated += 1
            row.length += 1
            reason = self._finish_reason(row, token)
            if reason:
                done.append((row.request, reason))
                continue
            row.request._emit("token", token)
            keep.append(i)
        self._keep_rows(keep)  # free the finished rows' cache before telling their consumers
        for request, reason in done:
            request._end(reason)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if keep:
            self._cache.keep(keep)
        else:
            self._cache = None  # an idle engine holds no KV memory

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        """Why the row ends with ``token`` (a stop token is not shown; the last token of a full budget is)."""
        request = row.request
        if request.cancelled:
            return "cancelled"
        reason = finish_reason(token, generated=row.generated, length=row.length, params=request.params,
                               stop_ids=request.stop_ids, max_length=request.max_length)
        if reason == "length":
            request._emit("token", token)
        return reason


def describe_failure(error: Exception) -> str:
    """A short, user-facing account of a generation failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return "the GPU ran out of memory for this request; try a shorter message or fewer max new tokens"
    return f"{type(error).__name__}: {error}"
