"""GPU benchmark on ChatGLM3-6B-shaped random weights (created on the GPU machine, nothing downloaded).

    python bench/gpu.py [--tokens 128] [--workdir /tmp]

Writes a full-size checkpoint in the original ChatGLM3 format, loads it through the app's own
loader in fp16 and in 4-bit NF4, and prints for each: resident GPU memory, time to first token,
decode tokens/s at batch 1 and 8 through the engine, transformers' own ``generate`` at batch 1 (the
1-user baseline of issue 12), and the bandwidth limit (weight bytes ÷ measured device copy
bandwidth) that batch-1 decode can at best approach. Exits 0 with a note
when no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic_checkpoints

import torch  # noqa: E402

PROMPT = "Please write a detailed story about a journey across the mountains and the sea. " * 4
# sentencepiece pieces of the generated tokenizer: its built-in corpus yields at most 926 (4000 failed
# with "Vocabulary size too high"); the 65 024-row embedding and output layer keep the real size.
SP_VOCAB = 800


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    return 2 * n_bytes / seconds


def raw_generate(model, ids: list[int], tokens: int) -> float:
    """transformers' own ``model.generate`` at batch 1 (same sampling), tokens/s: the engine's 1-user baseline."""
    input_ids = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                             temperature=0.8, top_p=0.8, top_k=0)
        torch.cuda.synchronize()
    return (out.shape[1] - input_ids.shape[1]) / (time.perf_counter() - start)


def measure(folder: Path, precision: str, tokens: int, bandwidth: float) -> dict:
    from chatglm_web.engine.scheduler import Engine
    from chatglm_web.generation import SamplingParams
    from chatglm_web.families.loading import load_from_folder
    from chatglm_web.settings import Settings

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_from_folder(folder, Settings(precision=precision, device="cuda"), "chatglm3-6b-shaped")
    model = loaded.model
    resident = torch.cuda.memory_allocated()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = loaded.chat_format.prompt_ids([{"role": "user", "content": PROMPT}])
    engine = Engine(model, max_batch_size=8)
    params = SamplingParams(temperature=0.8, top_p=0.8, max_new_tokens=tokens, seed=0)

    def run(batch: int) -> tuple[float, float]:
        requests = [engine.submit(ids, params, []) for _ in range(batch)]
        start = time.perf_counter()
        first = None
        counts = [0] * batch
        for i, request in enumerate(requests):
            for kind, value in request:
                if kind == "token":
                    counts[i] += 1
                    first = first or (time.perf_counter() - start)
                elif kind == "done" and value.reason == "error":
                    raise RuntimeError(f"{precision}, batch {batch}: the engine failed the request ({value.error})")
        return first, sum(counts) / (time.perf_counter() - start)

    run(1)  # warm-up
    ttft, rate1 = run(1)
    _, rate8 = run(8)
    engine.shutdown()
    raw1 = raw_generate(model, ids, tokens)
    result = {
        "precision": precision, "resident_gib": resident / 2**30, "weights_gib": weight_bytes / 2**30,
        "ttft_ms": ttft * 1000, "prompt_tokens": len(ids), "tok_s_b1": rate1, "tok_s_b8": rate8, "raw_b1": raw1,
        "bandwidth_bound_tok_s": bandwidth / weight_bytes,
    }
    del engine, model, loaded
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: GPU benchmark skipped")
        return
    from synthetic_checkpoints import TinyChatGLM3, train_tokenizer_model, write_checkpoint

    folder = Path(args.workdir) / "chatglm3-6b-random"
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        spec = TinyChatGLM3.chatglm3_6b(sp_vocab_size=SP_VOCAB)
        write_checkpoint(folder, spec, weights_format="safetensors", num_shards=7,
                         tokenizer_model=train_tokenizer_model(SP_VOCAB),
                         token_bias={2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0})
        print(f"wrote a ChatGLM3-6B-shaped checkpoint in {time.perf_counter() - start:.0f} s")
    bandwidth = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()} | measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("precision | resident GiB | weights GiB | TTFT ms (prompt) | tok/s b=1 | tok/s b=8 | bandwidth bound b=1 | "
          "b=1 / bound | b=8 / b=1 | b=1 / raw generate")
    for precision in ("fp16", "4bit"):
        r = measure(folder, precision, args.tokens, bandwidth)
        print(f"{r['precision']:9} | {r['resident_gib']:12.2f} | {r['weights_gib']:11.2f} | "
              f"{r['ttft_ms']:7.1f} ({r['prompt_tokens']}) | {r['tok_s_b1']:9.1f} | {r['tok_s_b8']:9.1f} | "
              f"{r['bandwidth_bound_tok_s']:19.1f} | {r['tok_s_b1'] / r['bandwidth_bound_tok_s']:11.2f} | "
              f"{r['tok_s_b8'] / r['tok_s_b1']:9.2f} | {r['tok_s_b1'] / r['raw_b1']:18.2f}")


if __name__ == "__main__":
    main()
