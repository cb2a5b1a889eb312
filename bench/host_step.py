"""Host time per decode step: issue 22's CPU proxy for the GPU's launch-bound step.

    python bench/host_step.py [--layers 28] [--tokens 64] [--rounds 5] [--threads 1] [--demo-only | --no-demo]

A ChatGLM3-format checkpoint as deep as ChatGLM3-6B (28 layers) but of tiny width (hidden 64) is generated,
so a step does almost no arithmetic: what it costs is the host's work per layer (Python, module calls, aten
dispatch), the same cost that leaves an H100 idle most of each step. Measured in this process, on one thread
(``--threads``), in turns (this machine's speed drifts; only measurements seconds apart are compared):

1. the engine's decode loop (``chatglm_web.engine.scheduler.Engine``: the step over KV slots, batched
   sampling), one request of ``--tokens`` tokens: milliseconds per token;
2. plain eager ``model.generate`` (greedy, transformers' own cache) of the same length: milliseconds per token;

and once, with ``torch.profiler``, the aten operators one decode forward of the model runs. Printed: each round, the
medians, and "engine step / generate step" (below 1: the engine's step costs the host less).

A change that cuts host work (fused projections, a compiled or graph-captured step) shows here as fewer
operators and fewer milliseconds per step; issue 22's targets on a GPU are measured by ``bench/gpu.py``.

Then the offline demo model every newcomer meets (SmolLM2-135M, 30 layers; from the cache, fetched once if
missing), on all the torch threads: the engine as the app runs it (the app's engine process, started as
``app.py`` starts it where no ChatGLM3 is cached or reachable; its main thread runs the loop over weights
prepacked for oneDNN, ``ModelStep.pack_for_cpu``) beside plain eager ``generate`` of the same checkpoint as
transformers loads it (fp32, greedy, in this process), in turns. Issue 22's target: the engine decodes at
least 1.5x as fast.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # synthetic_checkpoints: checkpoints in the original on-disk format

import torch  # noqa: E402

from chatglm_web.engine.events import Token  # noqa: E402
from chatglm_web.engine.scheduler import Engine  # noqa: E402
from chatglm_web.families.loading import load_from_folder  # noqa: E402
from chatglm_web.generation import SamplingParams  # noqa: E402
from chatglm_web.settings import Settings  # noqa: E402
from synthetic_checkpoints import TinyChatGLM3, write_checkpoint  # noqa: E402

NO_STOP = {2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0}  # replies run to their full length
PROMPT = list(range(5, 45))  # 40 prompt tokens of the tiny vocabulary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (ChatGLM3-6B: 28)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (tiny: the step is host time)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny-width part)")
    parser.add_argument("--demo-only", action="store_true", help="only the offline demo model's part")
    parser.add_argument("--no-demo", action="store_true", help="skip the offline demo model's part")
    return parser.parse_args(argv)


def engine_ms_per_token(engine, tokens: int, prompt: list[int] = PROMPT) -> float:
    request = engine.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=tokens), [])
    times = [time.perf_counter() for event in request if isinstance(event, Token)]
    return (times[-1] - times[0]) * 1000 / (len(times) - 1)


def generate_ms_per_token(model, tokens: int, prompt: list[int] = PROMPT) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=1, do_sample=False)  # the prefill alone, to subtract
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - started
    generated = out.shape[1] - ids.shape[1]
    return (total - prefill) * 1000 / (generated - 1)


def ops_per_step(engine: Engine | None, model=None) -> tuple[int, int]:
    """aten operators one decode forward runs (one token, after the prompt's prefill), (called by Python, all
    including those they call): the engine's step over
    a KV slot, or (``engine`` None) transformers' forward of ``model`` over its own cache. The profiler counts
    this thread only, so the forward runs here, not in the engine's thread."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from chatglm_web.engine.kv_slots import SlotCache

    with torch.inference_mode():
        if engine is None:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([PROMPT]), cache=cache, use_cache=True, logits_to_keep=1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True, logits_to_keep=1)
        else:
            step = engine.step
            prefill = step.new_cache(len(PROMPT))
            step.prefill_chunk(PROMPT, prefill, 0)
            slots = SlotCache()
            slots.add(step.prefilled_kv(prefill, 0, (0, len(PROMPT))))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step.decode([7], slots, [len(PROMPT)])
    aten = [event for event in prof.events() if event.name.startswith("aten::")]
    top = [event for event in aten if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")]
    return len(top), len(aten)


def tiny_width(args) -> None:
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="host-step-")) / "tiny"
    spec = TinyChatGLM3(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                        kv_channels=args.hidden // 4, ffn_hidden_size=args.hidden * 3 // 2)
    write_checkpoint(folder, spec, token_bias=NO_STOP, seed=1)
    loaded = load_from_folder(folder, Settings(model=str(folder), precision="fp32", device="cpu"), "tiny")
    model = loaded.model.eval()
    print(f"== {args.layers} layers, hidden {args.hidden}, fp32, {args.threads} thread(s), prompt {len(PROMPT)} "
          f"tokens, {args.tokens} tokens per reply")
    engine = Engine(model, max_batch_size=1, max_queue=0)
    print(f"engine step: {engine.step.describe()}")
    try:
        engine_ms_per_token(engine, 8)  # warm-up
        generate_ms_per_token(model, 8)
        ratios, engine_times, generate_times = [], [], []
        for round_ in range(1, args.rounds + 1):
            engine_ms = engine_ms_per_token(engine, args.tokens)
            generate_ms = generate_ms_per_token(model, args.tokens)
            engine_times.append(engine_ms)
            generate_times.append(generate_ms)
            ratios.append(engine_ms / generate_ms)
            print(f"round {round_}: engine {engine_ms:.2f} ms/token, eager generate {generate_ms:.2f} ms/token, "
                  f"ratio {engine_ms / generate_ms:.2f}")
        lean, reference = ops_per_step(engine), ops_per_step(None, model)
        print(f"engine decode step: {statistics.median(engine_times):.2f} ms (median); aten calls per decode "
              f"forward: the engine's {lean[0]} ({lean[1]} with nested ones), transformers' {reference[0]} "
              f"({reference[1]})")
    finally:
        engine.shutdown()
    print(f"eager generate step: {statistics.median(generate_times):.2f} ms (median)")
    print(f"engine step / generate step, in turns (median of {args.rounds}): {statistics.median(ratios):.2f}")


def demo_model(args) -> None:
    """The offline demo model: the engine as the app runs it (its own process) beside eager ``generate``, in turns."""
    from chatglm_web.engine.process import EngineProcess
    from chatglm_web.families.template.offline import load_offline_model

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    plain, tokenizer = load_offline_model()  # as transformers loads it: eager generate's model, in this process
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids)
    # the app's engine process, on the model the app starts with here (no ChatGLM3 cached, no Hub: the demo model)
    engine, _, info = EngineProcess.start(Settings(device="cpu"), max_batch_size=1, max_queue=0)
    try:
        print(f"== offline demo model ({info.name}, {plain.config.num_hidden_layers} layers), fp32, "
              f"{torch.get_num_threads()} thread(s) here, prompt {len(ids)} tokens, {args.tokens} tokens per reply; "
              "engine: the app's engine process (lean forward, weights packed for oneDNN)", flush=True)
        if not info.offline_demo:
            raise SystemExit(f"the app's default start loads {info.name} here, not the offline demo model")
        engine_ms_per_token(engine, 8, ids)
        generate_ms_per_token(plain, 8, ids)
        speedups = []
        for round_ in range(1, args.rounds + 1):
            engine_ms = engine_ms_per_token(engine, args.tokens, ids)
            generate_ms = generate_ms_per_token(plain, args.tokens, ids)
            speedups.append(generate_ms / engine_ms)
            print(f"round {round_}: engine {engine_ms:.1f} ms/token, eager generate {generate_ms:.1f} ms/token, "
                  f"generate / engine {generate_ms / engine_ms:.2f}", flush=True)
    finally:
        engine.shutdown()
    median = statistics.median(speedups)
    print(f"demo model: engine decodes {median:.2f}x as fast as eager generate, in turns (median of "
          f"{len(speedups)}; target >= 1.5: {'met' if median >= 1.5 else 'not met'})")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.demo_only:
        tiny_width(args)
    if not args.no_demo:
        demo_model(args)


if __name__ == "__main__":
    main()
