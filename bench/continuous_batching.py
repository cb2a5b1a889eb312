"""This app's engine beside transformers' own continuous batching, on the same model, in one run (issue 22).

    python bench/continuous_batching.py [--users 1 8] [--tokens 64] [--rounds 3] [--layers 8 --hidden 1024]

Issue 22 asks whether transformers' ``ContinuousBatchingManager`` (paged attention; CUDA graphs where the
attention needs no mask) serves as well as or better than this app's engine (``chatglm_web.engine``), and
whether it keeps what the app needs: per-request sampling, seeds, cancellation and chunked prefill. Here both
run on the SAME model object, in this process, one after the other:

1. **Speed, in turns.** A ChatGLM3-format checkpoint is generated (default: ``bench/speed.py``'s 87m shape,
   fp32; replies never stop, so each is exactly ``--tokens`` long) and loaded. For each round, each users count
   and each sampling mode (greedy; sampled at temperature 0.8, top-p 0.8), ``users`` streamed replies of the
   same prompt start at once on the engine and on the manager (the order alternates by round). Per load:
   aggregate generated tokens/s, the median time to first token (submit -> the token in the consumer's hands),
   and the median per-user decode rate (tokens after the first / time after the first). The machine's speed
   drifts, so the result is the median over rounds of the per-round ratio "engine / manager".
2. **Features, by trying them** (each a small function returning ``(passed, reason)``), on both sides: a greedy
   reply equals ``model.generate``'s; per-request sampling settings in one batch; temperature 0 (greedy, as
   the app sends it) beside a sampled request; per-request seeds; cancelling one streaming request; chunked
   prefill (a long prompt arriving while others stream).

How each side is driven:

* engine: ``Engine(model, max_batch_size=..., max_queue=...)``, ``engine.submit(ids, SamplingParams, ())``,
  one consumer thread per request iterating its events (as the app's handlers do);
* manager: ``model.init_continuous_batching(generation_config, ContinuousBatchingConfig)``, started in
  inference mode; ``add_request(ids, request_id=..., max_new_tokens=..., streaming=True, **per-request
  settings)``; one consumer thread reading ``get_result`` and routing outputs by request id (its
  ``request_id_iter`` puts other requests' outputs back on a shared queue and polls every 0.1 s, which would
  penalise it with several users). ``do_sample`` is a manager-wide setting, so greedy and sampled loads use one
  manager each. Its KV cache is sized for this workload (``num_blocks``; left to itself on a CPU it sizes the
  cache from 60 % of the machine's RAM and, for sdpa, preallocates a float32 attention mask of 8,192 batch
  tokens by every cache token: 13.4 GiB and half a minute to start for a 2-layer model on a 23 GiB machine),
  its token budget per step is the engine's prefill chunk, prefix sharing is off (the engine has no prefix
  cache; ``--prefix-sharing`` turns it on), ``auto_switch_to_flash`` is off (the model's attention
  implementation stays the one both sides use) and ``per_request_processors`` is on (per-request temperature
  and top-p). ``--cb key=value`` sets any other ``ContinuousBatchingConfig`` field (``use_cuda_graph=True``).

For a GPU run on a real model, import ``compare(model, prompt_ids, users, tokens, device="cuda")`` and
``feature_table(model, device="cuda")``; on CUDA, ``torch.cuda.synchronize`` brackets each load.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import itertools
import logging
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # synthetic_checkpoints: checkpoints in the original on-disk format

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

from chatglm_web.engine.events import Done, Token  # noqa: E402
from chatglm_web.engine.scheduler import Engine  # noqa: E402
from chatglm_web.generation import SamplingParams  # noqa: E402

NO_STOP = {2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0}  # replies run to their full length
TEMPERATURE, TOP_P = 0.8, 0.8  # the sampled loads (as bench/speed.py)
DEFAULT_CHUNK = 512  # the engine's prefill chunk when it does not say
PROBE_TOKENS = 24
WAIT_S = 600.0  # the longest a load or a probe waits for its replies


# -- streams: one request's tokens and their arrival times, whichever side serves it ----------------------------

@dataclass
class Stream:
    submitted: float
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    end: str | None = None  # how it ended: "length", "cancelled", "failed: ...", ...
    error: str | None = None
    cancelled_at: int | None = None  # tokens received when cancel() was called
    cancel: object = None  # () -> None
    budget: int = 0  # tokens asked for

    def add(self, token_ids: list[int]) -> None:
        now = time.perf_counter()
        for token in token_ids:
            self.tokens.append(token)
            self.times.append(now)

    def close(self, end: str, error: str | None = None) -> None:
        self.end, self.error = end, error
        self.finished.set()

    def wait(self, timeout: float = WAIT_S) -> Stream:
        if not self.finished.wait(timeout):
            raise TimeoutError(f"no end after {timeout:.0f} s ({len(self.tokens)} tokens so far)")
        return self

    def wait_tokens(self, count: int, timeout: float = WAIT_S) -> None:
        deadline = time.perf_counter() + timeout
        while len(self.tokens) < count and not self.finished.is_set():
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(self.tokens)} of {count} tokens after {timeout:.0f} s")
            time.sleep(0.002)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.submitted

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first token (what one user sees while the reply streams)."""
        span = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / span if span > 0 else float("inf")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class EngineSide:
    """This app's engine: a consumer thread per request iterates its events."""

    name = "engine"

    def __init__(self, model, max_batch: int, device="cpu"):
        self.device = device
        self.engine = Engine(model, max_batch_size=max_batch, max_queue=max_batch)
        self.chunk = getattr(self.engine, "prefill_chunk", DEFAULT_CHUNK)

    def submit(self, prompt: list[int], tokens: int, *, greedy: bool, temperature: float = TEMPERATURE,
               top_p: float = TOP_P, seed: int | None = None) -> Stream:
        params = SamplingParams(temperature=0.0 if greedy else float(temperature), top_p=float(top_p), top_k=0,
                                max_new_tokens=tokens, seed=seed)
        stream = Stream(time.perf_counter())
        request = self.engine.submit(prompt, params, ())
        stream.cancel = request.cancel

        def consume():
            try:
                for event in request:
                    if isinstance(event, Token):
                        stream.add([event.id])
                    elif isinstance(event, Done):
                        stream.close(str(event.reason), event.error)
            except Exception as error:  # noqa: BLE001 - recorded, the load reports it
                stream.close("failed", f"{type(error).__name__}: {error}")

        threading.Thread(target=consume, daemon=True).start()
        return stream

    def close(self) -> None:
        self.engine.shutdown()


class ManagerSide:
    """transformers' ContinuousBatchingManager, started on the model; one consumer thread routes its outputs."""

    name = "manager"
    _ids = itertools.count()

    def __init__(self, model, *, greedy: bool, num_blocks: int, chunk: int, device="cpu",
                 prefix_sharing: bool = False, options: dict | None = None):
        self.model, self.greedy, self.device, self.chunk = model, greedy, device, chunk
        generation = GenerationConfig(do_sample=not greedy, max_new_tokens=64, eos_token_id=-1, pad_token_id=0,
                                      **({} if greedy else {"temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0}))
        config = dict(num_blocks=num_blocks, max_batch_tokens=chunk, allow_block_sharing=prefix_sharing,
                      auto_switch_to_flash=False, per_request_processors=True)
        config.update(options or {})
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=ContinuousBatchingConfig(**config))
        # the manager may have switched the model to a paged implementation (eager -> "paged|eager"): the engine,
        # measured in turns on the same model, gets the original one back for its loads (``attention``)
        self.attn = model.config._attn_implementation
        self.manager.warmup()  # CUDA graphs / compile where enabled; creates the batch processor
        with torch.inference_mode():
            self.manager.start()
        self.streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._router = threading.Thread(target=self._route, daemon=True)
        self._router.start()

    @property
    def settings(self) -> str:
        c = self.manager.continuous_batching_config
        return (f"attention {self.attn}, cuda graphs (varlen, decode) {c.use_cuda_graph}, async batching "
                f"{c.use_async_batching}, {c.num_blocks} blocks of {c.page_size} tokens, {c.max_batch_tokens} tokens "
                f"per step, prefix sharing {c.allow_block_sharing}")

    def _route(self) -> None:
        while not self._stopping:
            output = self.manager.get_result(timeout=0.05)
            if output is None:
                fatal = self.manager.background_thread_status.fatal_error
                if fatal is not None or not self.manager.is_running():
                    why = f"generation loop ended: {type(fatal).__name__}: {fatal}" if fatal else "loop stopped"
                    with self._lock:
                        for stream in self.streams.values():
                            if not stream.finished.is_set():
                                stream.close("failed", why)
                    if not self._stopping:
                        time.sleep(0.05)
                continue
            with self._lock:
                stream = self.streams.get(output.request_id)
            if stream is None:
                continue
            new = output.generated_tokens[len(stream.tokens):]  # streamed outputs carry every token so far
            if new:
                stream.add(new)
            if output.error is not None:
                stream.close("failed", output.error)
            elif output.is_finished():
                stream.close("length" if len(stream.tokens) >= stream.budget else "stop")

    def submit(self, prompt: list[int], tokens: int, *, greedy: bool, temperature: float = TEMPERATURE,
               top_p: float = TOP_P, seed: int | None = None) -> Stream:
        if greedy != self.greedy:
            raise ValueError("do_sample is manager-wide: use the manager made for this mode")
        kwargs = {} if greedy else {"temperature": float(temperature), "top_p": float(top_p)}
        if seed is not None:
            kwargs["seed"] = seed  # no such per-request setting in transformers 5.24: the request fails (probe)
        request_id = f"r{next(self._ids)}"
        stream = Stream(time.perf_counter())
        stream.budget = tokens
        with self._lock:
            self.streams[request_id] = stream

        def cancel():
            self.manager.cancel_request(request_id)

        stream.cancel = cancel
        self.manager.add_request(list(prompt), request_id=request_id, max_new_tokens=tokens, streaming=True,
                                 **kwargs)
        return stream

    def close(self) -> None:
        self._stopping = True
        self._router.join(timeout=5)
        self.manager.stop(block=True, timeout=30)
        self.manager.destroy()


class attention:
    """Give the model one attention implementation for the duration (cheap: a config field)."""

    def __init__(self, model, implementation: str):
        self.model, self.implementation = model, implementation

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        if self.previous != self.implementation:
            self.model.set_attn_implementation(self.implementation)

    def __exit__(self, *exc):
        if self.model.config._attn_implementation != self.previous:
            self.model.set_attn_implementation(self.previous)


# -- loads -----------------------------------------------------------------------------------------------------

@dataclass
class Load:
    side: str
    users: int
    mode: str
    rate: float  # aggregate generated tokens/s, first submit -> last token
    ttft: float  # median seconds
    user_rate: float  # median per-user decode tokens/s

    def line(self) -> str:
        return (f"{self.side:7s} {self.users} user(s) {self.mode:7s}: {self.rate:8.1f} tok/s aggregate, "
                f"TTFT {self.ttft * 1000:7.1f} ms, {self.user_rate:7.1f} tok/s per user")


def run_load(side, prompt: list[int], users: int, tokens: int, mode: str, device="cpu", seed0: int = 1000) -> Load:
    """``users`` streamed replies of ``tokens`` tokens each, started at once on ``side``."""
    sync(device)
    greedy = mode == "greedy"
    streams = [side.submit(prompt, tokens, greedy=greedy, seed=None if greedy or side.name != "engine" else seed0 + i)
               for i in range(users)]
    for stream in streams:
        stream.wait()
    sync(device)
    bad = [(len(s.tokens), s.end, s.error) for s in streams if len(s.tokens) != tokens]
    if bad:
        raise RuntimeError(f"{side.name}: expected {tokens} tokens per reply, got {bad}")
    start = min(s.submitted for s in streams)
    end = max(s.times[-1] for s in streams)
    return Load(side.name, users, mode, users * tokens / (end - start), statistics.median(s.ttft for s in streams),
                statistics.median(s.decode_rate for s in streams))


def kv_blocks(max_users: int, longest: int, page_size: int = 256) -> int:
    """Blocks for ``max_users`` + 3 requests of ``longest`` tokens each (the probes run up to 3 together)."""
    return (max_users + 3) * math.ceil(longest / page_size) + 4


@dataclass
class Sides:
    engine: EngineSide
    managers: dict  # mode -> ManagerSide
    attn: str  # the model's own attention implementation (the engine's; a manager may switch it)

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()
        self.engine.close()


def start_sides(model, *, max_users: int, longest: int, modes=("greedy", "sampled"), device="cpu",
                prefix_sharing: bool = False, options: dict | None = None) -> Sides:
    original = model.config._attn_implementation
    engine = EngineSide(model, max(max_users, 4), device)
    try:
        blocks = kv_blocks(max_users, max(longest, 3 * engine.chunk + 8), (options or {}).get("page_size", 256))
        managers = {}
        for mode in modes:
            managers[mode] = ManagerSide(model, greedy=mode == "greedy", num_blocks=blocks, chunk=engine.chunk,
                                         device=device, prefix_sharing=prefix_sharing, options=options)
    except BaseException:
        for manager in locals().get("managers", {}).values():
            manager.close()
        engine.close()
        raise
    if model.config._attn_implementation != original:
        model.set_attn_implementation(original)
    return Sides(engine, managers, original)


def measure(sides: Sides, side_name: str, prompt, users, tokens, mode, device) -> Load:
    if side_name == "engine":
        with attention(sides.engine.engine.model, sides.attn):
            return run_load(sides.engine, prompt, users, tokens, mode, device)
    manager = sides.managers[mode]
    with attention(manager.model, manager.attn):
        return run_load(manager, prompt, users, tokens, mode, device)


@dataclass
class Comparison:
    loads: list[Load]
    ratios: dict  # (users, mode) -> [engine rate / manager rate per round]
    ttft_ratios: dict  # (users, mode) -> [engine TTFT / manager TTFT per round]


def compare(model, prompt_ids: list[int], users=(1, 8), tokens: int = 64, rounds: int = 3, device="cpu",
            modes=("greedy", "sampled"), prefix_sharing: bool = False, options: dict | None = None,
            sides: Sides | None = None, out=print) -> Comparison:
    """The engine and the manager on ``model``, in turns: per round, per users count, per mode, one load each
    (the order alternates by round). Prints each load and, per (users, mode), the medians; returns them."""
    own = sides is None
    if own:
        sides = start_sides(model, max_users=max(users), longest=len(prompt_ids) + tokens, modes=modes,
                            device=device, prefix_sharing=prefix_sharing, options=options)
    loads, ratios, ttft_ratios = [], {}, {}
    try:
        out(f"manager: {next(iter(sides.managers.values())).settings}; engine prefill chunk {sides.engine.chunk}")
        for mode in modes:  # warm-up: the first load of each side pays one-time costs
            for name in ("engine", "manager"):
                measure(sides, name, prompt_ids, max(users), min(tokens, 8), mode, device)
        for round_ in range(1, rounds + 1):
            for n in users:
                for mode in modes:
                    order = ("engine", "manager") if round_ % 2 else ("manager", "engine")
                    pair = {name: measure(sides, name, prompt_ids, n, tokens, mode, device) for name in order}
                    loads += pair.values()
                    ratio = pair["engine"].rate / pair["manager"].rate
                    ratios.setdefault((n, mode), []).append(ratio)
                    ttft_ratios.setdefault((n, mode), []).append(pair["engine"].ttft / pair["manager"].ttft)
                    out(f"round {round_}: {pair['engine'].line()}")
                    out(f"round {round_}: {pair['manager'].line()}   engine/manager {ratio:.2f}")
    finally:
        if own:
            sides.close()
    out("")
    for (n, mode), values in ratios.items():
        mine = [load for load in loads if load.users == n and load.mode == mode]
        med = {name: (statistics.median(x.rate for x in mine if x.side == name),
                      statistics.median(x.ttft for x in mine if x.side == name),
                      statistics.median(x.user_rate for x in mine if x.side == name)) for name in ("engine", "manager")}
        for name, (rate, ttft, user_rate) in med.items():
            out(f"{name:7s} {n} user(s) {mode:7s} (medians): {rate:8.1f} tok/s aggregate, TTFT {ttft * 1000:7.1f} ms, "
                f"{user_rate:7.1f} tok/s per user")
        ratio = statistics.median(values)
        faster = "engine" if ratio >= 1 else "manager"
        out(f"engine/manager at {n} user(s), {mode}: {ratio:.2f}x aggregate tok/s, "
            f"{statistics.median(ttft_ratios[(n, mode)]):.2f}x TTFT (medians of {len(values)} rounds in turns; "
            f"TTFT below 1: the engine's first token comes sooner) -> more tok/s: {faster}")
    return Comparison(loads, ratios, ttft_ratios)


# -- feature probes: each tries one thing on one side and says whether it held, and why ---------------------------

def greedy_reference(model, prompt: list[int], tokens: int, device="cpu") -> list[int]:
    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=None,
                              pad_token_id=0)
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


@contextlib.contextmanager
def quiet_manager_log():
    """For a probe expected to fail on the manager: its logger would print the traceback the reason already gives."""
    log = logging.getLogger("ContinuousBatchingLogger")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def first_difference(a: list[int], b: list[int]) -> str:
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"they differ from token {index} ({len(a)} vs {len(b)} tokens)"


def probe_greedy_matches_generate(greedy_side, prompt, reference) -> tuple[bool, str]:
    got = greedy_side.submit(prompt, len(reference), greedy=True).wait()
    if got.error:
        return False, f"the request failed: {got.error}"
    if got.tokens == reference:
        return True, f"{len(reference)} greedy tokens equal model.generate's"
    return False, f"greedy reply != model.generate's: {first_difference(got.tokens, reference)}"


def probe_per_request_sampling(side, prompt, reference) -> tuple[bool, str]:
    """Two requests in one batch: A nearly greedy (temperature 0.05, top-p 0.05: only the most likely token
    survives), B hot (temperature 1.5, top-p 1.0). Honoured: A equals the greedy reply, B does not."""
    n = len(reference)
    a = side.submit(prompt, n, greedy=False, temperature=0.05, top_p=0.05, seed=None if side.name != "engine" else 1)
    b = side.submit(prompt, n, greedy=False, temperature=1.5, top_p=1.0, seed=None if side.name != "engine" else 2)
    a.wait(), b.wait()
    if a.error or b.error:
        return False, f"a request failed: {a.error or b.error}"
    if a.tokens != reference:
        return False, f"the near-greedy request did not get the greedy reply: {first_difference(a.tokens, reference)}"
    if b.tokens == reference:
        return False, "the hot request got the greedy reply as well: one setting for the whole batch?"
    return True, "a near-greedy and a hot request in one batch: each got its own settings"


def probe_temperature_zero(side, prompt, reference, device="cpu") -> tuple[bool, str]:
    """Temperature 0 (the app's greedy) beside a sampled request, in one batch."""
    if side.name != "engine" and torch.device(device).type == "cuda":
        return False, ("not tried on CUDA: temperature 0 divides the logits by 0 and a NaN multinomial can end in a "
                       "device-side assert that poisons the process; see the CPU run")
    n = len(reference)
    seeds = (1, 2) if side.name == "engine" else (None, None)
    try:
        a = side.submit(prompt, n, greedy=False, temperature=0.0, top_p=1.0, seed=seeds[0])
        b = side.submit(prompt, n, greedy=False, temperature=1.0, top_p=1.0, seed=seeds[1])
    except Exception as error:  # noqa: BLE001
        return False, f"refused: {type(error).__name__}: {error}"
    try:
        a.wait(120), b.wait(120)
    except TimeoutError as error:
        return False, f"no reply: {error}"
    if a.error or b.error:
        return False, f"failed: {(a.error or b.error)[:200]}"
    if a.tokens != reference:
        return False, f"temperature 0 did not give the greedy reply: {first_difference(a.tokens, reference)}"
    return True, "temperature 0 gave the greedy reply beside a sampled request"


def probe_seeds(side, prompt, tokens: int = PROBE_TOKENS) -> tuple[bool, str]:
    """X (seed 7) alone; then Y (seed 8) and, while Y streams, X again: X's two replies equal, Y's differs."""
    params = dict(greedy=False, temperature=1.0, top_p=1.0)
    try:
        first = side.submit(prompt, tokens, seed=7, **params).wait()
    except Exception as error:  # noqa: BLE001
        return False, f"a per-request seed is refused: {type(error).__name__}: {error}"
    if first.error:
        return False, f"a per-request seed is refused: {first.error[:420]}"
    other = side.submit(prompt, tokens, seed=8, **params)
    other.wait_tokens(2)
    again = side.submit(prompt, tokens, seed=7, **params)
    other.wait(), again.wait()
    if again.tokens != first.tokens:
        return False, ("seed 7 twice (alone, then beside another request): "
                       f"{first_difference(again.tokens, first.tokens)}")
    if other.tokens == first.tokens:
        return False, "seeds 7 and 8 gave the same reply"
    return True, "seed 7 repeats its reply alone and in a batch; seed 8 differs"


def probe_cancel(side, prompt, mode: str, tokens: int = 48) -> tuple[bool, str]:
    """Three streaming requests; the middle one is cancelled after 4 tokens: it stops, the others finish."""
    greedy = mode == "greedy"
    streams = [side.submit(prompt, tokens, greedy=greedy) for _ in range(3)]
    victim = streams[1]
    victim.wait_tokens(4)
    victim.cancelled_at = len(victim.tokens)
    victim.cancel()
    for stream in (streams[0], streams[2]):
        stream.wait()
    victim.finished.wait(2.0)
    others = [len(s.tokens) for s in (streams[0], streams[2])]
    after = len(victim.tokens) - victim.cancelled_at
    ending = f"ended '{victim.end}'" if victim.finished.is_set() else "no final event for it within 2 s"
    if others != [tokens, tokens]:
        return False, f"the others got {others} of {tokens} tokens ({streams[0].error or streams[2].error})"
    if len(victim.tokens) >= tokens:
        return False, f"the cancelled request ran to its full {tokens} tokens"
    return True, f"it stopped {after} token(s) after cancel(), the others finished; {ending}"


def probe_chunked_prefill(side, prompt, mode: str, tokens: int = 64) -> tuple[bool, str]:
    """Two replies stream; a prompt of 3 prefill chunks arrives. Chunked: the running replies go on getting tokens
    while it is prefilled (>= 2 each between its arrival and its first token), rather than waiting for all of it."""
    greedy = mode == "greedy"
    running = [side.submit(prompt, tokens, greedy=greedy) for _ in range(2)]
    for stream in running:
        stream.wait_tokens(3)
    rng = random.Random(5)
    long_prompt = [rng.randrange(5, 400) for _ in range(3 * side.chunk)]
    arrival = time.perf_counter()
    long = side.submit(long_prompt, 2, greedy=greedy)
    long.wait()
    for stream in running:
        stream.wait()
    if long.error or not long.times:
        return False, f"the long prompt failed: {long.error}"
    first = long.times[0]
    during = [sum(arrival < t <= first for t in s.times) for s in running]
    before = [b - a for s in running for a, b in zip(s.times, s.times[1:]) if b <= arrival]
    gaps = [b - max(a, arrival) for s in running for a, b in zip(s.times, s.times[1:]) if a < first and b > arrival]
    detail = (f"{len(long_prompt)}-token prompt ({side.chunk} per step): prefilled in {first - arrival:.2f} s, "
              f"running replies got {during} tokens meanwhile; worst gap {max(gaps or [0]) * 1000:.0f} ms vs "
              f"median {statistics.median(before or [0]) * 1000:.0f} ms before")
    if max(s.end != "length" for s in running):
        return False, f"a running reply did not finish: {[s.error for s in running]}"
    return min(during) >= 2, detail


def feature_table(model, *, sides: Sides | None = None, device="cpu", out=print,
                  prompt: list[int] | None = None) -> dict:
    """Run every probe on both sides; print a table (and the reasons); return {feature: {side: (ok, reason)}}."""
    prompt = prompt or list(range(5, 45))
    own = sides is None
    if own:
        sides = start_sides(model, max_users=4, longest=len(prompt) + 64, device=device)
    with attention(model, sides.attn):
        reference = greedy_reference(model, prompt, PROBE_TOKENS, device)
    results: dict = {}
    try:
        for name in ("engine", "manager"):
            greedy_side = sides.engine if name == "engine" else sides.managers["greedy"]
            sampled_side = sides.engine if name == "engine" else sides.managers["sampled"]
            implementation = sides.attn if name == "engine" else sides.managers["greedy"].attn
            probes = [
                ("greedy reply = model.generate's",
                 functools.partial(probe_greedy_matches_generate, greedy_side, prompt, reference)),
                ("per-request temperature/top-p in one batch",
                 functools.partial(probe_per_request_sampling, sampled_side, prompt, reference)),
                ("per-request seeds", functools.partial(probe_seeds, sampled_side, prompt)),
                ("cancel one request mid-stream", functools.partial(probe_cancel, sampled_side, prompt, "sampled")),
                ("chunked prefill (long prompt while others stream)",
                 functools.partial(probe_chunked_prefill, greedy_side, prompt, "greedy")),
                # last: on the manager, temperature 0 may end its generation loop
                ("temperature 0 beside a sampled request",
                 functools.partial(probe_temperature_zero, sampled_side, prompt, reference, device)),
            ]
            for feature, probe in probes:
                with attention(model, implementation), quiet_manager_log():
                    try:
                        results.setdefault(feature, {})[name] = probe()
                    except Exception as error:  # noqa: BLE001 - a probe that breaks is a "no", with why
                        results.setdefault(feature, {})[name] = (False, f"{type(error).__name__}: {error}")
    finally:
        if own:
            sides.close()
    width = max(len(feature) for feature in results)
    out("")
    out(f"{'feature (tried, not read)':{width}s}  engine  manager")
    for feature, by_side in results.items():
        engine, manager = ("yes" if by_side[name][0] else "NO" for name in ("engine", "manager"))
        out(f"{feature:{width}s}  {engine:6s}  {manager}")
    out("")
    for feature, by_side in results.items():
        for name, (ok, reason) in by_side.items():
            out(f"  {feature} / {name}: {'yes' if ok else 'NO'}: {reason}")
    return results


# -- the script ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (1024 with 8 layers: the 87m shape)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--attn", default=None,
                        help="the model's attention implementation for both sides (default: as loaded, sdpa)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--prefix-sharing", action="store_true", help="let the manager share prompt blocks")
    parser.add_argument("--cb", action="append", default=[], metavar="KEY=VALUE",
                        help="a ContinuousBatchingConfig field for the manager (a Python literal), "
                             "e.g. use_cuda_graph=True")
    parser.add_argument("--no-features", action="store_true", help="skip the feature table")
    return parser.parse_args(argv)


def spec_for(layers: int, hidden: int):
    from synthetic_checkpoints import TinyChatGLM3

    if hidden >= 128:  # head dim 64, two key/value groups (the 87m shape at hidden 1024: ffn 2730)
        heads, head_dim = hidden // 64, 64
    else:
        heads, head_dim = 4, hidden // 4
    return TinyChatGLM3(hidden_size=hidden, num_layers=layers, num_attention_heads=heads, kv_channels=head_dim,
                        multi_query_group_num=2, ffn_hidden_size=hidden * 8 // 3, padded_vocab_size=640)


def load_model(layers: int, hidden: int, device: str, precision: str):
    from synthetic_checkpoints import write_checkpoint
    from chatglm_web.families.loading import load_from_folder
    from chatglm_web.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="cb-bench-")) / "tiny"
    write_checkpoint(folder, spec_for(layers, hidden), token_bias=NO_STOP, seed=1)
    loaded = load_from_folder(folder, Settings(model=str(folder), precision=precision, device=device), "tiny")
    return loaded.model.eval()


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(args.layers, args.hidden, args.device, args.precision)
    if args.attn:
        model.set_attn_implementation(args.attn)
    params = sum(p.numel() for p in model.parameters())
    prompt = [random.Random(1).randrange(5, 400) for _ in range(args.prompt_tokens)]
    import transformers

    print(f"== {args.layers} layers, hidden {args.hidden} ({params / 1e6:.1f} M parameters), {args.precision} on "
          f"{args.device}, attention {model.config._attn_implementation}, {torch.get_num_threads()} thread(s), "
          f"transformers {transformers.__version__}, torch {torch.__version__}; prompt {len(prompt)} tokens, "
          f"{args.tokens} tokens per reply, users {args.users}, {args.rounds} round(s) in turns")
    options = parse_options(args.cb)
    sides = start_sides(model, max_users=max(args.users), longest=len(prompt) + max(args.tokens, 64),
                        device=args.device, prefix_sharing=args.prefix_sharing, options=options)
    try:
        compare(model, prompt, args.users, args.tokens, args.rounds, args.device, modes=tuple(args.modes),
                sides=sides)
        if not args.no_features:
            feature_table(model, sides=sides, device=args.device)
    finally:
        sides.close()
    print(f"\n(whole run: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
