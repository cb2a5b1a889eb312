"""Issue 22 on a lent GPU: ChatGLM3-6B-shaped random weights, made on the GPU machine (nothing downloaded).

    python bench/gpu.py --quick               # the one lent-GPU run: <= 6 minutes on an H100, checkpoint included
    python bench/gpu.py                       # longer replies, 3 rounds, the manager's feature table
    python bench/gpu.py --tiny                # the same on a tiny checkpoint: a smoke test on the GPU (~1 minute)
    python bench/gpu.py --device cpu --tiny   # the same code path on the CPU (tests/test_bench_gpu.py)

A ChatGLM3-6B-shaped checkpoint is written in the original on-disk format (``tests/synthetic_checkpoints.py``:
sentencepiece tokenizer, 7 safetensors shards; the random weights are drawn on the GPU) and loaded through the
app's own loader (``load_from_folder``) in fp16, then in 4-bit NF4. Replies never stop (the stop tokens are
biased away), so each has exactly ``--tokens`` tokens. Every part runs in its own ``try``: one that fails
prints its error and the run goes on; results are printed as they come. The parts, with what they cost on an
H100 with ``--quick`` (estimates: nothing here has run on a GPU yet):

  part                                                                     --quick on an H100
  0. imports, CUDA start                                                   ~10 s
  1. checkpoint: 6.2 B random fp16 weights drawn on the GPU, written to    ~25 s (~90 s if drawn on the CPU;
     --workdir (default /dev/shm when it has room) as 7 shards             skipped when already there)
  2. copy bandwidth (device-to-device, read + write counted)              ~1 s
  3. sampling host syncs: ``choose_tokens`` on [8, 65 024] CUDA logits,    ~2 s
     mixed settings, under ``torch.cuda.set_sync_debug_mode("warn")``
  per precision (fp16, then 4bit):
  4. load through the app's loader                                         fp16 ~30 s, 4bit ~45 s
  5. the SDPA backends that take the lean forward's attention calls, and   ~2 s
     one decode step's attention as called vs with each key-value group's
     query heads folded into the query length
  6. engine: warm-up (captures the CUDA graphs), decode at batch 1 and 8,  ~15 s (fp16), ~25 s (4bit)
     a greedy check (graph replays vs the eager step vs generate), batch
     1 with the graphs off, transformers' ``model.generate`` at batch 1,
     host syncs per generated token
  7. TTFT of a 1000-token prompt vs one plain forward of it                ~3 s
  8. the targets table                                                     -
  9. fp16: transformers' ContinuousBatchingManager beside the engine       ~60-90 s (only when it fits the
     (bench/continuous_batching.py: sampled, 1 and 8 users, 1 round in      time left; its feature table
     --quick), CUDA graphs on                                               only without --quick)
  total                                                                    ~4-5 min; --quick stops at 330 s
                                                                           whatever happens (--deadline)

The fp16 model stays loaded beside the 4-bit one (80 GB hold both) so that part 9 can run last, where an
overrun cannot cost the 4-bit numbers; it is freed first when less than 24 GiB are free after its parts.
The first line printed names the device and the versions of torch, transformers (>= 5.24: the engine calls
the model with ``cache=``), bitsandbytes (4-bit) and pydantic (``chatglm_web.generation``); a missing one
shows there, and the parts that need it fail alone.

Issue 22's targets, as ratios within this run (printed last, each "met" / "not met"): fp16 decode at batch 1
>= 0.6 of the bandwidth bound (weight bytes / measured copy bandwidth); batch 8 aggregate >= 6x batch 1; 4-bit
at batch 1 >= fp16 at batch 1; TTFT of a 1000-token prompt <= 2x its forward time; no host syncs in sampling;
the decode step replayed as CUDA graphs. Decode rates count the tokens after each reply's first over the time
after the first token (prefill apart); "steady" is one token per median gap between tokens (one-off costs
such as a graph capture apart). Exits 0 with a note when no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests", REPO / "bench"):  # the app; synthetic_checkpoints; continuous_batching
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402 - after the paths

PROMPT = "Please write a detailed story about a journey across the mountains and the sea. " * 4
# sentencepiece pieces of the generated tokenizer: its built-in corpus yields at most 926 (4000 failed
# with "Vocabulary size too high"); the 65 024-row embedding and output layer keep the real size.
SP_VOCAB = 800
NO_STOP = {2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0}  # replies run to their full length
TEMPERATURE, TOP_P = 0.8, 0.8
QUICK_DEADLINE_S = 330.0  # --quick: stop here whatever happens (the GPU run's budget is 6 minutes)
WAIT_S = 180.0  # the longest one engine load may take before it counts as hung
CB_ESTIMATE_S = {"compare": 90.0, "features": 75.0}  # part 9 runs only when this much time is left
FAST_DIRS = ("/dev/shm",)


def say(*parts) -> None:
    print(*parts, flush=True)


# -- time: each part's report, and the deadline --------------------------------------------------------------

class Deadline:
    """Seconds since the start; ``limit`` 0: none. When armed, a watchdog ends the process at the limit (after
    printing what was measured): a part that hangs cannot overrun the GPU's budget."""

    def __init__(self, limit: float, on_expiry=None):
        self.start = time.perf_counter()
        self.limit = limit
        self._timer = None
        if limit > 0 and on_expiry is not None:
            self._timer = threading.Timer(limit, on_expiry)
            self._timer.daemon = True
            self._timer.start()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if self.limit <= 0 else self.limit - self.elapsed

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Part:
    """``with Part("name", "~10 s")``: prints the part's start and end; an exception inside is printed (type,
    message, where) and swallowed, so the next part runs. ``ok`` says whether it got through."""

    current = "start"

    def __init__(self, name: str, estimate: str = ""):
        self.name, self.estimate, self.ok = name, estimate, False

    def __enter__(self):
        Part.current = self.name
        self.start = time.perf_counter()
        say(f"\n-- {self.name}" + (f"  [H100 estimate: {self.estimate}]" if self.estimate else ""))
        return self

    def __exit__(self, kind, error, tb):
        seconds = time.perf_counter() - self.start
        if error is None:
            self.ok = True
            say(f"   ({self.name}: {seconds:.1f} s)")
            return False
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not ours to swallow
            return False
        where = traceback.extract_tb(tb)[-3:]
        say(f"   FAILED after {seconds:.1f} s: {type(error).__name__}: {str(error)[:800]}")
        for frame in where:
            say(f"     at {Path(frame.filename).name}:{frame.lineno} {frame.name}: {frame.line}")
        free_memory()
        return True


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# -- 1. the checkpoint -----------------------------------------------------------------------------------------

def default_workdir(need_bytes: int) -> str:
    """A RAM-backed folder when it has room (writing and reading 12.5 GB there takes seconds), else the temp dir."""
    for candidate in FAST_DIRS:
        try:
            if os.access(candidate, os.W_OK) and shutil.disk_usage(candidate).free > 1.3 * need_bytes:
                return candidate
        except OSError:
            continue
    return tempfile.gettempdir()


def make_checkpoint(folder: Path, tiny: bool, device: str) -> Path:
    """The checkpoint in ``folder`` (kept for the next run; a folder without the marker of a finished write is
    written again). Weights drawn on ``device``."""
    import synthetic_checkpoints as sc

    marker = folder / ".complete"
    if marker.exists():
        say(f"checkpoint: {folder} (already written)")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    spec = sc.TinyChatGLM3() if tiny else sc.TinyChatGLM3.chatglm3_6b(sp_vocab_size=SP_VOCAB)
    start = time.perf_counter()
    sc.write_checkpoint(folder, spec, weights_format="safetensors", num_shards=2 if tiny else 7,
                        tokenizer_model=sc.train_tokenizer_model(spec.sp_vocab_size), token_bias=NO_STOP, device=device)
    marker.write_text("ok\n")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    say(f"checkpoint: wrote {folder} ({gib(size)} of safetensors, weights drawn on {device}) in "
        f"{time.perf_counter() - start:.1f} s")
    return folder


# -- 2. bandwidth ----------------------------------------------------------------------------------------------

def copy_bandwidth(device, n_bytes: int) -> float:
    """Bytes/s of a copy on ``device`` (read + write counted), the best of 10 after a warm-up."""
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * n_bytes / best


# -- 3. host syncs ---------------------------------------------------------------------------------------------

def sync_debug_available(device) -> bool:
    return torch.device(device).type == "cuda" and hasattr(torch.cuda, "set_sync_debug_mode")


@contextlib.contextmanager
def counting_syncs(device):
    """Yields a list that receives the synchronizing CUDA calls (torch's sync debug mode, "warn") made inside,
    from any thread. On a CPU there is no such mode: the list stays empty."""
    debug = sync_debug_available(device)
    found: list[str] = []
    previous = torch.cuda.get_sync_debug_mode() if debug else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode(previous)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())


def mixed_params():
    """8 rows of mixed settings: greedy, top-p only, top-k and top-p, plain temperature, a repetition penalty."""
    from chatglm_web.generation import SamplingParams

    settings = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.8), dict(temperature=1.0, top_p=1.0),
                dict(temperature=0.7, top_p=0.5, top_k=40), dict(temperature=1.2, top_p=0.95),
                dict(temperature=0.8, top_p=0.8, repetition_penalty=1.1), dict(temperature=0.5, top_k=1),
                dict(temperature=0.9, top_p=0.9, top_k=100)]
    return [SamplingParams(max_new_tokens=16, seed=i, **s) for i, s in enumerate(settings)]


def sampling_syncs(device, results: dict) -> None:
    """Part 3: the synchronizing calls of ``choose_tokens`` on a [8, 65 024] batch, its final ``.tolist()`` (the
    one transfer of the chosen ids) excluded; with the parts apart, and two calls around it in the engine."""
    from chatglm_web.engine.sampling import (
        _sample,
        choose_tokens,
        penalized_ids,
        seeded_generator,
    )

    params = mixed_params()
    logits = torch.randn(8, 65024, generator=torch.Generator().manual_seed(0)).to(device)
    seen = [penalized_ids(p, list(range(5, 200)), device) for p in params]

    def choose():
        generators = [seeded_generator(p.seed) for p in params]
        return choose_tokens(logits.clone(), params, generators, seen)

    choose()  # warm-up: first-call costs (pinned memory, kernels) apart
    sync(device)
    with counting_syncs(device) as whole:
        tokens = choose()
    ids = torch.tensor(tokens, device=device)
    sync(device)
    with counting_syncs(device) as transfer:
        ids.tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k != 1]
    index = torch.tensor(sampled).to(device)
    rows = logits[index]
    sync(device)
    with counting_syncs(device) as inner:
        _sample(rows, [params[i] for i in sampled], [seeded_generator(params[i].seed) for i in sampled])
    with counting_syncs(device) as list_index:  # the scheduler's logits[live] (a Python list of rows)
        logits[list(range(8))]
    with counting_syncs(device) as host_tensor:  # graphs.decode's static inputs: torch.tensor(list, device=...)
        torch.tensor([1, 2, 3], device=device)
    sync(device)
    excluded = len(whole) - len(transfer)
    results["syncs"] = excluded
    note = "" if sync_debug_available(device) else "  (no CUDA sync debug mode on this device: nothing to count)"
    say(f"choose_tokens on [8, 65024] {torch.device(device).type} logits, mixed settings: {len(whole)} synchronizing "
        f"call(s), the final .tolist() {len(transfer)} of them -> {excluded} in sampling (target 0){note}")
    say(f"  _sample alone: {len(inner)}; in the engine around it: logits[<python list>] {len(list_index)}, "
        f"torch.tensor(<list>, device=...) {len(host_tensor)} (each a host wait, not sampling's)")
    for message in sorted(set(whole))[:3]:
        say(f"  e.g.: {message[:200]}")


# -- 4. load ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Loaded:
    precision: str
    model: object
    chat_format: object
    resident: int  # bytes the load added on the device
    weight_bytes: int  # parameter bytes (4-bit: packed weights plus their quantization statistics)


def quant_state_bytes(model) -> int:
    """Bytes of bitsandbytes' quantization statistics (absmax, nested absmax, code): not parameters."""
    total, seen = 0, set()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for part in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code", "offset"):
                tensor = getattr(part, name, None)
                if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
    return total


def load(folder: Path, precision: str, device: str) -> Loaded:
    from chatglm_web.families.loading import load_from_folder
    from chatglm_web.settings import Settings

    free_memory()
    before = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0
    loaded = load_from_folder(folder, Settings(precision=precision, device=device), "chatglm3-6b-shaped")
    model = loaded.model
    resident = (torch.cuda.memory_allocated() - before) if torch.device(device).type == "cuda" else 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + quant_state_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    say(f"{precision}: {type(model).__name__}, {params / 1e9:.2f} G parameter elements ({', '.join(dtypes)}), "
        f"weights {gib(weight_bytes)}, resident {gib(resident)}, attention {model.config._attn_implementation}")
    return Loaded(precision, model, loaded.chat_format, resident, weight_bytes)


# -- 5. attention backends -------------------------------------------------------------------------------------

def sdpa_backends(lean, device) -> None:
    """Which of SDPA's backends accept the lean forward's attention calls (boolean mask, grouped KV heads)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = lean.embed.weight.dtype
    heads, kv_heads, dim = lean.heads, lean.kv_heads, lean.head_dim
    cases = {"decode b=1 span 256": (1, 1, 256), "decode b=8 span 256": (8, 1, 256),
             "prefill chunk 512 over 1024": (1, 512, 1024)}
    backends = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
                if hasattr(SDPBackend, b)]
    for name, (batch, width, span) in cases.items():
        q = torch.randn(batch, heads, width, dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, span, dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        positions = torch.arange(span - width, span, device=device).expand(batch, width)
        mask = (torch.arange(span, device=device) <= positions[..., None])[:, None]
        accepted = []
        for backend in backends:
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
                accepted.append(backend.split("_")[0].lower())
            except Exception:  # noqa: BLE001 - "no available kernel": this backend does not take the call
                pass
        sync(device)
        say(f"SDPA backends for {name} ({heads} query / {kv_heads} key-value heads, boolean mask, {dtype}): "
            f"{', '.join(accepted) or 'none'}")
    attention_cost(lean, device)


def attention_cost(lean, device, repeats: int = 10) -> None:
    """The decode step's attention as the lean forward calls it (boolean mask, ``enable_gqa``) beside the same
    arithmetic with each key-value group's query heads folded into the query length (one query position per row
    in decode: no grouped-query support needed, so no backend falls back to repeating K and V), for all the
    layers of one step. Eager calls: the smallest cases measure launches more than the GPU."""
    import torch.nn.functional as F

    dtype = lean.embed.weight.dtype
    heads, kv_heads, dim, layers = lean.heads, lean.kv_heads, lean.head_dim, len(lean.layers)
    group = heads // kv_heads
    generator = torch.Generator(device=device).manual_seed(0)
    for batch, span in ((1, 256), (8, 256), (8, 512), (8, 1024)):
        q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype, generator=generator)
        k = torch.randn(batch, kv_heads, span, dim, device=device, dtype=dtype, generator=generator)
        v = torch.randn(batch, kv_heads, span, dim, device=device, dtype=dtype, generator=generator)
        positions = torch.arange(span - batch, span, device=device)[:, None]  # each row's own length
        mask = (torch.arange(span, device=device) <= positions[..., None])[:, None]  # [B, 1, 1, span]

        def as_called(q=q, k=k, v=v, mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)

        def folded(q=q, k=k, v=v, mask=mask, batch=batch):
            out = F.scaled_dot_product_attention(q.view(batch, kv_heads, group, dim), k, v, attn_mask=mask)
            return out.view(batch, heads, 1, dim)

        torch.testing.assert_close(folded(), as_called(), rtol=2e-2, atol=2e-2)
        times = {}
        for name, fn in (("as called", as_called), ("folded", folded)):
            fn()
            samples = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                for _ in range(layers):
                    fn()
                sync(device)
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples)
        say(f"attention of one decode step ({layers} layers), b={batch} span {span}: as called "
            f"{times['as called'] * 1000:.2f} ms, query heads folded per key-value group {times['folded'] * 1000:.2f} ms")


# -- 6. the engine ---------------------------------------------------------------------------------------------

class Stream:
    """One request's events, as the engine delivers them (``on_event``, in the engine's thread): token ids and
    their arrival times, and how it ended."""

    def __init__(self):
        from chatglm_web.engine.events import Done, QueuePosition, Token

        self._kinds = Token, Done, QueuePosition
        self.submitted = time.perf_counter()
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.finished = threading.Event()
        self.reason = None
        self.error = None

    def __call__(self, event) -> None:
        now = time.perf_counter()
        Token, Done, QueuePosition = self._kinds
        if isinstance(event, Token):
            self.tokens.append(event.id)
            self.times.append(now)
        elif isinstance(event, Done):
            self.reason, self.error = event.reason, event.error
            self.finished.set()
        elif not isinstance(event, QueuePosition):
            raise TypeError(f"unexpected event {event!r}")


@dataclasses.dataclass
class Run:
    batch: int
    tokens: int  # generated, all replies
    aggregate: float  # tokens / (last token - first submit)
    decode: float  # tokens after each reply's first / (last token - first "first token")
    steady: float  # batch / median gap between a reply's tokens
    ttft: float  # median seconds, submit -> first token
    captures: int  # graphs captured during the run

    def line(self) -> str:
        return (f"b={self.batch}: decode {self.decode:8.1f} tok/s, steady {self.steady:8.1f} tok/s, aggregate "
                f"{self.aggregate:8.1f} tok/s, TTFT {self.ttft * 1000:7.1f} ms, {self.tokens} tokens, "
                f"{self.captures} graph capture(s) during it")


def serve(engine, prompt: list[int], params: list, timeout: float = WAIT_S) -> list[Stream]:
    """Submit one request per ``params`` at once; wait for every reply; an error or a hang raises."""
    from chatglm_web.generation import FinishReason

    streams, requests = [], []
    for p in params:
        stream = Stream()
        requests.append(engine.submit(prompt, p, (), on_event=stream))
        streams.append(stream)
    deadline = time.perf_counter() + timeout
    for stream in streams:
        if not stream.finished.wait(max(0.0, deadline - time.perf_counter())):
            for request in requests:
                request.cancel()
            raise TimeoutError(f"no end of the replies after {timeout:.0f} s ({[len(s.tokens) for s in streams]} "
                               "tokens so far): the engine hangs")
    failed = [s for s in streams if s.reason == FinishReason.ERROR]
    if failed:
        raise RuntimeError(f"the engine failed {len(failed)} of {len(streams)} request(s): {failed[0].error}")
    return streams


def captures_of(engine) -> int:
    graphs = engine.step.graphs
    return graphs.captures if graphs is not None else 0


def sampled(tokens: int, batch: int, seed0: int = 0) -> list:
    from chatglm_web.generation import SamplingParams

    return [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=tokens, seed=seed0 + i)
            for i in range(batch)]


def decode_run(engine, prompt: list[int], batch: int, tokens: int) -> Run:
    before = captures_of(engine)
    streams = serve(engine, prompt, sampled(tokens, batch))
    short = [len(s.tokens) for s in streams if len(s.tokens) != tokens]
    if short:
        say(f"   note: replies of {short} tokens instead of {tokens} (a stop token despite the bias?)")
    total = sum(len(s.tokens) for s in streams)
    first = min(s.times[0] for s in streams)
    last = max(s.times[-1] for s in streams)
    after_first = sum(len(s.tokens) - 1 for s in streams)
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:])]
    return Run(batch, total, total / (last - min(s.submitted for s in streams)),
               after_first / (last - first) if last > first else float("nan"),
               batch / statistics.median(gaps) if gaps else float("nan"),
               statistics.median(s.times[0] - s.submitted for s in streams), captures_of(engine) - before)


def best_of(engine, prompt, batch: int, tokens: int, rounds: int, label: str) -> Run:
    runs = []
    for round_ in range(1, rounds + 1):
        run = decode_run(engine, prompt, batch, tokens)
        say(f"   {label} round {round_}: {run.line()}")
        runs.append(run)
    return max(runs, key=lambda r: r.decode)


def greedy_tokens(engine, prompt: list[int], tokens: int) -> list[int]:
    from chatglm_web.generation import SamplingParams

    return serve(engine, prompt, [SamplingParams(temperature=0.0, max_new_tokens=tokens, seed=0)])[0].tokens


def first_difference(a: list[int], b: list[int]) -> str:
    if a == b:
        return "equal"
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differ from token {index} of {max(len(a), len(b))}"


class _EagerReplay:
    """The CPU's stand-in for a captured graph (as tests/test_lean_forward.py's): replay runs the step again."""

    def __init__(self, run):
        self.output = run()
        self.graph = self
        self._run = run

    def replay(self) -> torch.Tensor:
        self.output.copy_(self._run())
        return self.output


def with_stand_in_graphs(engine) -> None:
    """On a CPU, give the engine ``DecodeGraphs`` with an eager stand-in for the capture, so this script's graph
    bookkeeping (captures, usable, the graphs-off comparison) runs as on a GPU. No speed meaning."""
    from chatglm_web.engine.graphs import DecodeGraphs

    if engine.step.lean is not None and engine.step.graphs is None:
        engine.step.graphs = DecodeGraphs(engine.step.lean, capture=lambda run, pool, device: _EagerReplay(run))


def new_engine(model, device: str, graphs: bool = True):
    from chatglm_web.engine.scheduler import Engine

    engine = Engine(model, max_batch_size=8, max_queue=8)
    if not graphs:
        engine.step.graphs = None
    elif torch.device(device).type == "cpu":
        with_stand_in_graphs(engine)
    return engine


def describe_graphs(engine) -> str:
    graphs = engine.step.graphs
    if graphs is None:
        return "graphs: none"
    return f"graphs: {graphs.captures} captured, usable {graphs.usable}"


def generate_rate(model, prompt: list[int], tokens: int, device: str) -> tuple[float, float]:
    """transformers' ``model.generate`` at batch 1, sampled as the engine (eager, its own cache): (decode tok/s after
    the first token, tok/s overall). A streamer takes each token's time."""
    from transformers.generation.streamers import BaseStreamer

    class Times(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first put is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    input_ids = torch.tensor([prompt], device=device)
    common = dict(attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                  top_k=0)
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=4, **common)  # warm-up
        sync(device)
        times = Times()
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, streamer=times, **common)
        sync(device)
        end = time.perf_counter()
    generated = out.shape[1] - input_ids.shape[1]
    decode = (len(times.times) - 1) / (times.times[-1] - times.times[0]) if len(times.times) > 1 else float("nan")
    return decode, generated / (end - start)


def engine_part(loaded: Loaded, prompt: list[int], args, results: dict) -> None:
    """Parts 5 and 6 for one precision: each measurement in its own ``Part``."""
    device, model, r = args.device, loaded.model, results.setdefault(loaded.precision, {})
    tokens, rounds, p = args.tokens, args.rounds, loaded.precision
    engine = eager = None
    if "sdpa" not in args.skip:
        with Part(f"5. {p}: SDPA backends for the lean forward's attention, and its cost per decode step", "2 s"):
            from chatglm_web.engine.forward import lean_forward_for

            lean = lean_forward_for(model)  # the engine's own (its fused weights are made once per model)
            if lean is None:
                say("no lean forward for this model: the engine runs transformers' forward")
            else:
                sdpa_backends(lean, device)
            del lean
    with Part(f"6. {p}: engine warm-up at batch 1 and 8 (the CUDA graphs are captured here)", "5 s") as warm:
        engine = new_engine(model, device)
        say(f"engine built: {engine.step.describe()}")
        for batch in (1, 8):
            decode_run(engine, prompt, batch, tokens)
        describe = engine.step.describe()
        say(f"decode step: {describe}; {describe_graphs(engine)}"
            + ("  (CPU: an eager stand-in for the capture, no speed meaning)" if device == "cpu" else ""))
        r["describe"] = describe
        if engine.step.graphs is not None:
            r["captures"], r["usable"] = engine.step.graphs.captures, engine.step.graphs.usable
    if warm.ok:
        with Part(f"6. {p}: engine decode at batch 1 ({tokens} tokens, best of {rounds} round(s))", "2 s"):
            r["b1"] = best_of(engine, prompt, 1, tokens, rounds, "graphs on ")
        with Part(f"6. {p}: engine decode at batch 8", "3 s"):
            r["b8"] = best_of(engine, prompt, 8, tokens, rounds, "graphs on ")
    with Part(f"6. {p}: engine decode at batch 1 with the graphs off", "4 s") as off:
        eager = new_engine(model, device, graphs=False)
        say(f"decode step: {eager.step.describe()}; {describe_graphs(eager)}")
        decode_run(eager, prompt, 1, tokens)  # warm-up
        r["b1_eager"] = best_of(eager, prompt, 1, tokens, rounds, "graphs off")
    if warm.ok:
        with Part(f"6. {p}: greedy check (the graphs' replies vs the eager step's and generate's)", "3 s"):
            n = min(32, tokens)
            first, second = greedy_tokens(engine, prompt, n), greedy_tokens(engine, prompt, n)
            say(f"greedy {n} tokens: graphs run 1 vs run 2 (new KV slots): {first_difference(first, second)}"
                " (must be equal)")
            if off.ok:
                say(f"greedy {n} tokens: graphs vs graphs off: "
                    f"{first_difference(first, greedy_tokens(eager, prompt, n))}"
                    " (random weights: near-ties may part where the attention span differs)")
            with torch.inference_mode():
                ids = torch.tensor([prompt], device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n)
            say(f"greedy {n} tokens: graphs vs model.generate: {first_difference(first, out[0, len(prompt):].tolist())}")
    if "generate" not in args.skip:
        with Part(f"6. {p}: transformers' model.generate at batch 1 (eager, the baseline)", "5 s"):
            decode, overall = generate_rate(model, prompt, tokens, device)
            r["generate"] = decode
            say(f"model.generate b=1: decode {decode:8.1f} tok/s, overall {overall:8.1f} tok/s")
    serving = engine if warm.ok else (eager if off.ok else None)
    if "syncs" not in args.skip and serving is not None:
        with Part(f"6. {p}: host syncs per generated token in the engine (one request)", "1 s"):
            n = 16
            if not sync_debug_available(device):
                say("no CUDA sync debug mode on this device: not counted")
            else:
                before = captures_of(serving)
                with counting_syncs(device) as found:
                    serve(serving, prompt, sampled(n, 1))
                say(f"{len(found)} synchronizing calls for {n} tokens ({len(found) / n:.1f} per token; "
                    f"{captures_of(serving) - before} graph capture(s) during it)")
    if "ttft" not in args.skip and serving is not None:
        with Part(f"7. {p}: TTFT of a {args.ttft_tokens}-token prompt vs its forward", "3 s"):
            ttft_part(serving, model, args, r)
    for name, label in (("b1", "graphs on "), ("b8", "graphs on "), ("b1_eager", "graphs off")):
        if name in r:
            say(f"{p} best, {label} {r[name].line()}")
    for e in (engine, eager):
        if e is not None:
            with contextlib.suppress(Exception):
                e.shutdown()
    del engine, eager
    free_memory()


# -- 7. TTFT ---------------------------------------------------------------------------------------------------

def ttft_part(engine, model, args, r: dict) -> None:
    from chatglm_web.generation import SamplingParams

    device = args.device
    rng = random.Random(22)
    high = 300 if args.tiny else SP_VOCAB
    long_prompt = [rng.randrange(5, high) for _ in range(args.ttft_tokens)]
    ids = torch.tensor([long_prompt], device=device)
    forwards = []
    with torch.inference_mode():
        for i in range(4):  # the first is a warm-up
            sync(device)
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            sync(device)
            if i:
                forwards.append(time.perf_counter() - start)
    forward = statistics.median(forwards)
    firsts = []
    for i in range(4):
        stream = serve(engine, long_prompt, [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=1,
                                                            seed=i)])[0]
        if i:
            firsts.append(stream.times[0] - stream.submitted)
    ttft = statistics.median(firsts)
    r["ttft"], r["forward"] = ttft, forward
    say(f"{len(long_prompt)}-token prompt: engine TTFT {ttft * 1000:.1f} ms (prefill chunk "
        f"{engine.prefill_chunk}), one plain forward {forward * 1000:.1f} ms -> {ttft / forward:.2f}x (target <= 2)")


# -- 8. the targets --------------------------------------------------------------------------------------------

def targets_table(results: dict, args) -> list[str]:
    """Issue 22's targets as ratios within this run: one line each, "met" / "not met" / "not measured"."""
    main, quant = args.precisions[0], "4bit"
    m, q = results.get(main, {}), results.get(quant, {})
    bound = results.get("bound", {}).get(main)
    rows = []

    def row(target: str, value: float | None, detail: str, goal: str, ok, shown: str | None = None) -> None:
        verdict = "not measured" if value is None else ("met" if ok(value) else "NOT MET")
        shown = "-" if value is None else (shown or f"{value:.2f}")
        rows.append(f"{target:44s} | {shown:>6s} | {goal:7s} | {verdict:12s} | {detail}")

    b1, b8 = m.get("b1"), m.get("b8")
    row(f"{main} decode b=1 / bandwidth bound", b1.decode / bound if b1 and bound else None,
        f"{b1.decode:.1f} of {bound:.1f} tok/s (steady {b1.steady:.1f})" if b1 and bound else "", ">= 0.6",
        lambda v: v >= 0.6)
    row(f"{main} decode b=8 aggregate / b=1", b8.decode / b1.decode if b1 and b8 else None,
        f"{b8.decode:.1f} vs {b1.decode:.1f} tok/s (steady {b8.steady:.1f} vs {b1.steady:.1f})" if b1 and b8 else "",
        ">= 6", lambda v: v >= 6)
    q1 = q.get("b1")
    row(f"{quant} decode b=1 / {main} b=1", q1.decode / b1.decode if q1 and b1 else None,
        f"{q1.decode:.1f} vs {b1.decode:.1f} tok/s" if q1 and b1 else
        ("4-bit not run on this device" if quant not in args.precisions else ""), ">= 1", lambda v: v >= 1)
    for precision in (main, quant):
        p = results.get(precision, {})
        if "ttft" in p or precision == main:
            ratio = p["ttft"] / p["forward"] if "ttft" in p else None
            row(f"{precision} TTFT {args.ttft_tokens}-token prompt / its forward", ratio,
                f"{p['ttft'] * 1000:.1f} vs {p['forward'] * 1000:.1f} ms" if "ttft" in p else "", "<= 2",
                lambda v: v <= 2)
    syncs = results.get("syncs")
    row("host syncs in sampling (choose_tokens)", None if syncs is None else float(syncs),
        "synchronizing calls, the final .tolist() excluded" if sync_debug_available(args.device)
        else "no CUDA sync debug mode on this device", "0", lambda v: v == 0, str(syncs))
    graphs = "CUDA graphs" in m.get("describe", "") and m.get("usable", False) and m.get("captures", 0) > 0
    stand_in = " (CPU: an eager stand-in for the capture)" if torch.device(args.device).type == "cpu" else ""
    row(f"{main} decode step replayed as CUDA graphs", None if "describe" not in m else float(graphs),
        f"{m.get('describe', '')}; {m.get('captures', 0)} captured in the warm-up, usable {m.get('usable')}{stand_in}",
        "yes", lambda v: v == 1, "yes" if graphs else "no")
    info = []
    for precision in (main, quant):
        p = results.get(precision, {})
        if p.get("b1") and p.get("b1_eager"):
            info.append(f"{precision} b=1 graphs on / off: {p['b1'].decode / p['b1_eager'].decode:.2f}x")
        if p.get("b1") and p.get("generate"):
            info.append(f"{precision} engine b=1 / model.generate b=1: {p['b1'].decode / p['generate']:.2f}x")
    for users, (ratio, faster) in sorted(results.get("cb", {}).items()):
        info.append(f"engine / ContinuousBatchingManager at {users} user(s), sampled: {ratio:.2f}x -> keep the {faster}")
    header = f"{'target':44s} | {'ratio':>6s} | {'goal':7s} | {'verdict':12s} | detail"
    return [header, "-" * len(header), *rows, *(f"  {line}" for line in info)]


def print_table(results: dict, args, why: str = "") -> None:
    say(f"\n== issue 22 targets, ratios within this run{why} ({results.get('device', args.device)}; "
        f"command: python bench/gpu.py {' '.join(args.argv)})")
    for line in targets_table(results, args):
        say(line)


# -- 9. transformers' continuous batching ----------------------------------------------------------------------

def continuous_batching_part(model, prompt: list[int], args, deadline: Deadline, results: dict) -> None:
    import continuous_batching as cb

    cuda = torch.device(args.device).type == "cuda"
    features = "features" not in args.skip and not args.quick
    modes = ("sampled",) if args.quick else ("greedy", "sampled")
    options = {"use_cuda_graph": True} if cuda else {}
    sides = cb.start_sides(model, max_users=8, longest=len(prompt) + args.tokens,
                           modes=("greedy", "sampled") if features else modes, device=args.device, options=options)
    try:
        comparison = cb.compare(model, prompt, (1, 8), args.tokens, 1 if args.quick else args.rounds, args.device,
                                modes=modes, sides=sides, out=say)
        # a CUDA call from the manager's thread during one of the engine's captures would fail that capture (and
        # leave the engine eager for the rest): say how the engine's side ran
        say(f"engine side: {sides.engine.engine.step.describe()}; {describe_graphs(sides.engine.engine)}")
        for (users, mode), ratios in comparison.ratios.items():
            if mode == "sampled":
                ratio = statistics.median(ratios)
                results.setdefault("cb", {})[users] = (ratio, "engine" if ratio >= 1 else "manager")
        if features and deadline.fits(CB_ESTIMATE_S["features"]):
            cb.feature_table(model, sides=sides, device=args.device, out=say)
        elif features:
            say(f"feature table skipped: {deadline.left():.0f} s left")
    finally:
        sides.close()


# -- the script ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"the lent-GPU run: 64 tokens, 2 rounds, stops at {QUICK_DEADLINE_S:.0f} s")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per reply (default 64 with --quick, else 256)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per decode load (2 with --quick, else 3)")
    parser.add_argument("--ttft-tokens", type=int, default=1000, help="the long prompt's tokens (TTFT)")
    parser.add_argument("--workdir", default=None,
                        help="where the checkpoint is written (default: /dev/shm when it has room, else the temp dir)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny ChatGLM3-shaped checkpoint (the script's logic)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp16", "bf16", "fp32", "4bit"],
                        help="default: fp16 4bit on CUDA, fp32 on the CPU (4-bit needs CUDA)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["generate", "ttft", "syncs", "sdpa", "cb", "features"], help="parts to leave out")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds after which the run prints what it has and exits 0 (default {QUICK_DEADLINE_S:.0f} "
                             "with --quick, else none; 0: none)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.tokens = args.tokens or (64 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.deadline is None:
        args.deadline = QUICK_DEADLINE_S if args.quick else 0.0
    if args.precisions is None:
        args.precisions = ["fp16", "4bit"] if args.device == "cuda" else ["fp32"]
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs the tiny checkpoint only (add --tiny): a 6B model on the CPU takes hours")
    return args


def environment(args) -> str:
    import platform

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("transformers", "bitsandbytes", "accelerate", "pydantic", "safetensors", "sentencepiece"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as error:  # noqa: BLE001 - a missing or broken package is reported, not fatal here
            versions.append(f"{name} MISSING ({type(error).__name__})")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = (f"{torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                  f"{props.multi_processor_count} SMs), CUDA {torch.version.cuda}")
    else:
        device = f"CPU, {torch.get_num_threads()} torch thread(s)"
    return device + " | " + ", ".join(versions)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA GPU here: GPU benchmark skipped (try --device cpu --tiny for the script's logic)")
        return 0
    results: dict = {}
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass

    def expired():
        say(f"\n!! deadline of {args.deadline:.0f} s reached during '{Part.current}': stopping here")
        with contextlib.suppress(Exception):
            print_table(results, args, " (cut short by the deadline)")
        sys.stdout.flush()
        os._exit(0)

    deadline = Deadline(args.deadline, expired)
    try:
        run(args, results, deadline)
    finally:
        deadline.cancel()
    say(f"\n(whole run: {deadline.elapsed:.0f} s)")
    return 0


def run(args, results: dict, deadline: Deadline) -> None:
    device = args.device
    try:
        results["device"] = environment(args)
    except Exception as error:  # noqa: BLE001 - the header is not worth the run
        results["device"] = f"{device} ({type(error).__name__}: {error})"
    say(f"== bench/gpu.py {' '.join(args.argv)}: {results['device']}")
    say(f"   {args.tokens} tokens per reply, {args.rounds} round(s), precisions {' '.join(args.precisions)}, "
        f"deadline {'none' if args.deadline <= 0 else f'{args.deadline:.0f} s'}")
    try:
        from chatglm_web.engine.scheduler import Engine  # noqa: F401 - the app imports, or nothing can run
        from chatglm_web.generation import SamplingParams  # noqa: F401
    except Exception as error:  # noqa: BLE001
        say(f"the app cannot be imported here ({type(error).__name__}: {error}): nothing measured")
        return

    folder = None
    name = "chatglm3-tiny-random" if args.tiny else "chatglm3-6b-random"
    workdirs = [Path(args.workdir)] if args.workdir else [Path(default_workdir(2**20 if args.tiny else 13 * 2**30))]
    if not args.workdir and workdirs[0] != Path(tempfile.gettempdir()):
        workdirs.append(Path(tempfile.gettempdir()))  # where the fast folder fails (full, say)
    for workdir in workdirs:
        with Part(f"1. checkpoint in {workdir}", "25 s, once"):
            folder = make_checkpoint(workdir / name, args.tiny, device)
        if folder is not None:
            break
        shutil.rmtree(workdir / name, ignore_errors=True)
    if folder is None:
        return

    bound_bandwidth = None
    with Part("2. copy bandwidth", "1 s"):
        bound_bandwidth = copy_bandwidth(device, (64 << 20) if device == "cpu" else (2 << 30))
        say(f"copy bandwidth on {device}: {bound_bandwidth / 1e9:.0f} GB/s (read + write counted)")
    if "syncs" not in args.skip:
        with Part("3. host syncs in sampling", "2 s"):
            sampling_syncs(device, results)

    keep: dict[str, Loaded] = {}
    prompt = None
    for precision in args.precisions:
        loaded = None
        if precision == "4bit" and device != "cuda":
            say(f"\n-- {precision}: skipped (bitsandbytes 4-bit needs CUDA)")
            continue
        with Part(f"4. load {precision}", "30-45 s") as loading:
            loaded = load(folder, precision, device)
            prompt = loaded.chat_format.prompt_ids([{"role": "user", "content": PROMPT}])
            say(f"prompt: {len(prompt)} tokens")
            if bound_bandwidth:
                bound = bound_bandwidth / loaded.weight_bytes
                results.setdefault("bound", {})[precision] = bound
                say(f"bandwidth bound at b=1 ({precision}): {bound:.1f} tok/s (each step reads the "
                    f"{gib(loaded.weight_bytes)} of weights once, embedding included, as issue 22 defines it)")
        if not loading.ok:
            del loaded
            free_memory()
            continue
        engine_part(loaded, prompt, args, results)
        if precision == args.precisions[0] and "cb" not in args.skip:
            keep[precision] = loaded  # part 9 runs on it last
            if device == "cuda":
                free, total = torch.cuda.mem_get_info()
                say(f"GPU memory after {precision}: {gib(free)} free of {gib(total)}")
                if free < 24 * 2**30 and len(args.precisions) > 1:
                    say(f"   freeing the {precision} model for the next load (part 9 loads it again if time allows)")
                    keep[precision] = None
        del loaded
        free_memory()

    with Part("8. the targets"):
        print_table(results, args)

    main = args.precisions[0]
    if "cb" in args.skip or main not in keep:
        return
    if not deadline.fits(CB_ESTIMATE_S["compare"]):
        say(f"\n-- 9. ContinuousBatchingManager beside the engine: skipped, {deadline.left():.0f} s left "
            f"(needs about {CB_ESTIMATE_S['compare']:.0f} s; run without --quick)")
        return
    with Part(f"9. {main}: transformers' ContinuousBatchingManager beside the engine", "60-90 s"):
        loaded = keep[main] or load(folder, main, device)
        prompt = loaded.chat_format.prompt_ids([{"role": "user", "content": PROMPT}])
        continuous_batching_part(loaded.model, prompt, args, deadline, results)
    for users, (ratio, faster) in sorted(results.get("cb", {}).items()):
        say(f"engine / ContinuousBatchingManager at {users} user(s), sampled: {ratio:.2f}x -> keep the {faster}")


if __name__ == "__main__":
    sys.exit(main())
