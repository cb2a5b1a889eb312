"""The scheduler: one worker thread owns the model and serves every request in one batch.

    request = engine.submit(prompt_ids, params, stop_ids)   # EngineBusy when the line is full
    for event in request: ...                                # or: async for event in request
    request.cancel()                                         # frees its slot within one step

Events are typed (``events.py``): ``QueuePosition`` (sent when the position changes), ``Token``
and, last, ``Done`` with a ``FinishReason`` and, for an error, what went wrong.

Admission (``admission.py``): at most ``max_batch_size`` requests run and at most ``max_queue``
wait; a submit beyond that raises ``EngineBusy`` at once. A request whose prefill fails (say, out of
memory on one long prompt) ends with an error alone; the running replies go on.

Continuous batching: a new request is prefilled apart from the running batch (only the last
position's logits; the whole prompts of requests admitted together in one left-padded forward),
then its keys and values join the running batch; every decode step advances all running requests
by one token. Prefill is chunked: each turn of the loop prefills at most ``prefill_chunk`` prompt
tokens (of one or several new requests) and then runs one decode step, so a long prompt arriving
while others stream delays their next token by one chunk at most, not by its whole prefill. The
running batch's keys and values live in KV slots (``kv_slots.py``): a preallocated slot per
request, each writing its new token at its own position, read through a boolean mask; a finished
or cancelled request's slot is freed at once and an idle engine holds no cache, so memory follows
the live requests and nothing accumulates between turns (on a GPU whose decode step is replayed as
CUDA graphs, the slots' tensors stay for the next burst: the graphs read them). The forward passes
are ``step.py``'s (a lean forward with fused projections, replayed as CUDA graphs on a GPU);
each request samples with its own settings and its own seeded generator (``sampling.py``).
"""

from __future__ import annotations

import logging
import threading

import torch

from chatglm_web.engine.admission import AdmissionPolicy, WaitingLine
from chatglm_web.engine.events import describe_failure
from chatglm_web.engine.kv_slots import SlotCache
from chatglm_web.engine.request import GenerationRequest
from chatglm_web.engine.sampling import choose_tokens, penalized_ids, request_seed, seeded_generator
from chatglm_web.engine.step import ModelStep
from chatglm_web.engine.transfer import to_device
from chatglm_web.generation import FinishReason, SamplingParams
from chatglm_web.settings import DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512


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


class _Prefill:
    """A request whose prompt is being prefilled, chunk by chunk, into its own cache."""

    def __init__(self, request: GenerationRequest, cache):
        self.request = request
        self.cache = cache
        self.done = 0  # prompt tokens already in the cache

    @property
    def remaining(self) -> int:
        return len(self.request.prompt_ids) - self.done


def context_length_of(model) -> int:
    """The model's context length from its config (``DEFAULT_CONTEXT_LENGTH`` when it does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT_LENGTH


class Engine:
    def __init__(self, model, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
                 context_length: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 own_thread: bool = True):
        """``own_thread=False``: the loop runs where ``run()`` is called (the main thread of the engine
        process: oneDNN's CPU kernels run markedly faster there than in a thread started later)."""
        self.model = model
        self.step = ModelStep(model)
        self.device = self.step.device
        self.admission = AdmissionPolicy(max_batch_size, max_queue)
        self.prefill_chunk = max(1, prefill_chunk)
        self.context_length = context_length or context_length_of(model)
        self._own_thread = own_thread
        self._waiting = WaitingLine(self.admission)
        self._rows: list[_Row] = []
        self._admitting: list[GenerationRequest] = []  # taken from the line, prefill not yet done
        self._prefills: dict[int, _Prefill] = {}  # request id -> its prefill in progress (worker thread only)
        self._cache: SlotCache | None = None  # the running batch's KV slots
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the engine's surface (protocol.GenerationEngine) ---------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=(), on_event=None) -> GenerationRequest:
        """Queue a generation. ``on_event(event)``, when given, receives the events (called from the
        engine's thread) instead of the returned request's iterators."""
        request = GenerationRequest(prompt_ids, params, stop_ids, self.context_length, on_event=on_event,
                                    on_cancel=self._notify)
        with self._wake:
            self._check_capacity()
            self._waiting.append(request)
            self._ensure_thread()
            self._wake.notify()
        return request

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting): requests generating, and requests waiting for a slot."""
        return self.admission.split(len(self._rows) + len(self._admitting) + len(self._waiting))

    @property
    def alive(self) -> bool:
        """The worker is running or can start on the next submit (not shut down, not crashed)."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    def check_capacity(self) -> None:
        """Raise ``EngineBusy`` if a submit now would be refused (a cheap early check)."""
        with self._wake:
            self._check_capacity()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=10)

    def run(self) -> None:
        """Run the loop in the calling thread until ``shutdown()`` (with ``own_thread=False``)."""
        self._run()

    # -- the loop -------------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        self.admission.check(*self.load)

    def _notify(self) -> None:
        with self._wake:  # a cancelled waiter leaves the line at the loop's next turn, even when it is idle
            self._wake.notify()

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
                self._waiting.drop_cancelled()
                self._admitting += self._waiting.take(len(self._rows) + len(self._admitting))
            with torch.inference_mode():
                self._prefill_some()
                if self._rows:
                    try:
                        self._decode_step()
                    except Exception as error:  # the shared batch is unusable: fail its rows, keep serving
                        log.exception("decode step failed")
                        self._fail_running(error)
        with self._wake:
            left = self._admitting + self._waiting.clear()
        self._fail_running(RuntimeError("the engine stopped"), left)

    def _fail_running(self, error: Exception, extra: list[GenerationRequest] = ()) -> None:
        for request in [row.request for row in self._rows] + list(extra):
            request.end(FinishReason.ERROR, describe_failure(error))
        self._rows, self._cache = [], None
        self.step.release_memory()

    # -- prefill --------------------------------------------------------------------------------
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
                self.step.release_memory()
        while budget > 0 and self._admitting:
            request = self._admitting[0]
            prefill = self._prefills.get(request.id)
            if prefill is None:
                prefill = self._prefills[request.id] = _Prefill(request, self.step.new_cache(len(request.prompt_ids)))
            try:
                if request.cancelled:
                    request.end(FinishReason.CANCELLED)
                else:
                    size = min(budget, prefill.remaining)
                    budget -= size
                    logits = self.step.prefill_chunk(request.prompt_ids[prefill.done:prefill.done + size],
                                                     prefill.cache, prefill.done)
                    prefill.done += size
                    if prefill.remaining:
                        continue  # more chunks of this prompt in the next turns
                    self._admit(request, self.step.prefilled_kv(prefill.cache, 0, (0, prefill.done)), logits)
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
        cache, logits, spans = self.step.prefill_together([r.prompt_ids for r in group])
        for i, request in enumerate(group):
            try:
                self._admit(request, self.step.prefilled_kv(cache, i, spans[i]), logits[i:i + 1])
            except Exception as error:
                self._prefill_failed(request, error)
            self._admitted(request)

    def _prefill_failed(self, request: GenerationRequest, error: Exception) -> None:
        log.error("prefill of request %d (%d prompt tokens) failed: %s: %s", request.id,
                  len(request.prompt_ids), type(error).__name__, error)
        request.end(FinishReason.ERROR, describe_failure(error))
        self.step.release_memory()

    def _admit(self, request: GenerationRequest, kv: list, logits: torch.Tensor) -> None:
        """Choose the first token of a prefilled request and join its cache to the batch."""
        generator = seeded_generator(request_seed(request.params))
        seen = penalized_ids(request.params, request.prompt_ids)
        token = choose_tokens(logits.float(), [request.params], [generator], [seen])[0]
        row = _Row(request, token, generator)
        if self._ends(row, token):
            return
        request.token(token)
        batch = self._cache or SlotCache()
        batch.add(kv)  # a failure leaves the running batch as it was
        self._cache = batch
        self._admitted(request, row)

    def _admitted(self, request: GenerationRequest, row: _Row | None = None) -> None:
        """Move a request out of admission: into the batch (``row``), or out (done / failed)."""
        with self._wake:
            if row is not None:
                self._rows.append(row)
            if request in self._admitting:
                self._admitting.remove(request)

    # -- decode ---------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        rows = self._rows
        logits = self.step.decode([row.last_token for row in rows], self._cache,
                                  [row.length - 1 for row in rows])  # the last token is not cached yet
        live = [i for i, row in enumerate(rows) if not row.request.cancelled]
        if len(live) < len(rows):  # the cancelled rows' logits are not sampled (an index copied without a wait)
            logits = logits[to_device(torch.tensor(live, dtype=torch.long, device="cpu"), self.device)]
        tokens = dict(zip(live, choose_tokens(
            logits, [rows[i].request.params for i in live], [rows[i].generator for i in live],
            [penalized_ids(rows[i].request.params, rows[i].seen) for i in live])))
        keep, done = [], []
        for i, row in enumerate(rows):
            if i not in tokens:
                done.append((row.request, FinishReason.CANCELLED))
                continue
            token = tokens[i]
            row.seen.append(token)
            row.generated += 1
            row.length += 1
            reason = row.request.finish_reason(token, generated=row.generated, length=row.length)
            if reason:
                if reason == FinishReason.LENGTH:
                    row.request.token(token)  # the last token of a full budget is shown
                done.append((row.request, reason))
                continue
            row.request.token(token)
            keep.append(i)
        self._keep_rows(keep)  # free the finished rows' slots before telling their consumers
        for request, reason in done:
            request.end(reason)

    def _ends(self, row: _Row, token: int) -> bool:
        """End the row's request if ``token`` ends it (the last token of a full budget is shown first)."""
        reason = row.request.finish_reason(token, generated=row.generated, length=row.length)
        if reason == FinishReason.LENGTH:
            row.request.token(token)
        if reason:
            row.request.end(reason)
        return reason is not None

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if keep or self.step.keeps_slots:  # on a GPU, CUDA graphs read the slots: they stay for the next burst
            self._cache.keep(keep)
        else:
            self._cache = None  # an idle engine holds no KV memory
