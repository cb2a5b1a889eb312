"""The engine's lean forward (engine/forward.py), its CUDA-graph path (engine/graphs.py, driven here by an
eager stand-in for the capture) and sampling without host waits: the same logits as transformers' own
forward for every step the engine runs, on every layout it claims; anything else keeps transformers'."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (GlmConfig, GlmForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from chatglm_web.engine import graphs as graphs_module
from chatglm_web.engine.forward import lean_forward_for
from chatglm_web.engine.graphs import DecodeGraphs, Replay, bucket
from chatglm_web.engine.kv_slots import SlotCache
from chatglm_web.engine.sampling import choose_tokens
from chatglm_web.engine.step import ModelStep
from chatglm_web.families.loading import load_from_folder
from chatglm_web.generation import SamplingParams
from chatglm_web.settings import Settings

PROMPTS = [list(range(3, 40)), list(range(50, 61)), [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]


def tiny_llama(**overrides) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                            "tie_word_embeddings": True, "initializer_range": 0.2, **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_qwen2() -> nn.Module:  # biases on q, k and v
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2)
    return Qwen2ForCausalLM(config).eval()


def deep_glm() -> nn.Module:
    """ChatGLM3's architecture as transformers has it (GlmForCausalLM: partial interleaved rotary, fused gate/up),
    12 layers deep, so that the per-layer operators outweigh the step's fixed ones."""
    torch.manual_seed(0)
    config = GlmConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=12,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       attention_bias=True, initializer_range=0.2, pad_token_id=0)
    return GlmForCausalLM(config).eval()


@pytest.fixture(scope="module")
def glm(chatglm3_checkpoint):
    return load_from_folder(chatglm3_checkpoint, Settings(precision="fp32", device="cpu"), "tiny").model


def steps_of(step: ModelStep, prompts=PROMPTS, decode_steps: int = 70, chunk: int = 13) -> list[torch.Tensor]:
    """Every logits row the engine would sample from: each prompt prefilled in chunks, then the batch decoding
    ``decode_steps`` tokens (more than one span block of 64 positions, with growth of the slots)."""
    out, slots = [], SlotCache()
    with torch.inference_mode():
        for prompt in prompts:
            cache = step.new_cache(len(prompt))
            for start in range(0, len(prompt), chunk):
                logits = step.prefill_chunk(prompt[start:start + chunk], cache, start)
            out.append(logits.float())
            slots.add(step.prefilled_kv(cache, 0, (0, len(prompt))))
        lengths = [len(p) for p in prompts]
        for t in range(decode_steps):
            out.append(step.decode([(t * 7 + i) % 290 + 3 for i in range(len(prompts))], slots, lengths))
            lengths = [n + 1 for n in lengths]
    return out


def assert_same_logits(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0.1, "logits too flat to tell a wrong forward from a right one"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("make", ["glm", "llama", "llama-scaled-rope", "qwen2"])
def test_the_lean_forward_gives_transformers_logits_for_every_step(make, glm):
    model = {"glm": lambda: glm, "llama": tiny_llama, "qwen2": tiny_qwen2,
             "llama-scaled-rope": lambda: tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 500.0})}[make]()
    reference = ModelStep(model, lean=False)
    lean = ModelStep(model)
    assert lean.lean is not None and lean.describe() == "lean forward"
    assert lean.lean.rotary.interleaved == (make == "glm"), "GLM rotates interleaved pairs, Llama/Qwen2 halves"
    assert_same_logits(steps_of(lean), steps_of(reference))


def test_prompts_prefilled_together_match_one_by_one(glm):
    step = ModelStep(glm)
    with torch.inference_mode():
        cache, logits, spans = step.prefill_together(PROMPTS)
        assert spans == [(0, len(p)) for p in PROMPTS]
        together = SlotCache()
        for row, span in enumerate(spans):
            together.add(step.prefilled_kv(cache, row, span))
        lengths = [len(p) for p in PROMPTS]
        after_together = step.decode([3, 4, 5], together, lengths)  # what steps_of decodes first
    alone = steps_of(step, decode_steps=1, chunk=1000)
    torch.testing.assert_close(logits.float(), torch.cat(alone[:3]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after_together, alone[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["4bit", "8bit", "bf16"])
def test_quantized_and_16_bit_models_run_the_lean_forward_too(precision, tmp_path, tokenizer_model):
    """bitsandbytes' layers are called one by one (not fused), 16-bit weights fused; the KV slots take the
    model's compute dtype. Same logits as transformers' forward of the same weights, within that precision."""
    from chatglm_web.families.chatglm3.loader import load_glm_model
    from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
    from chatglm_web.families.loading import from_pretrained_kwargs
    from synthetic_checkpoints import TinyChatGLM3, write_checkpoint

    spec = TinyChatGLM3(hidden_size=128, num_attention_heads=4, kv_channels=32, ffn_hidden_size=256)  # bnb: x64 dims
    folder = write_checkpoint(tmp_path / "q", spec, tokenizer_model=tokenizer_model)
    model = load_glm_model(folder, ChatGLM3Tokenizer.from_pretrained(folder), **from_pretrained_kwargs(precision, "cpu"))
    step = ModelStep(model)
    assert step.lean is not None
    fused = step.lean.layers[0].qkv.fused
    assert (fused is None) == (precision != "bf16"), "quantized layers stay as they are"
    got = steps_of(step, decode_steps=4)
    expected = steps_of(ModelStep(model, lean=False), decode_steps=4)
    tolerance = 0.05 if precision == "bf16" else 0.02
    scale = max(float(e.abs().max()) for e in expected)
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance * scale)


def test_fusing_adds_no_memory_and_leaves_the_model_working():
    model = tiny_llama()
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    parameters_before = sum(p.numel() for p in model.parameters())
    step = ModelStep(model)
    attention = model.model.layers[0].self_attn
    fused = step.lean.layers[0].qkv.fused
    assert fused is not None and fused.weight.shape[0] == 64 + 2 * 32
    for part in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert part.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == parameters_before
    assert ModelStep(model).lean.layers[0].qkv.fused is fused, "a second step over the model reuses the fusion"
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_unfused_lean_forward_calls_the_layers_one_by_one(glm):
    model = tiny_llama()
    step = ModelStep(model, fuse=False)
    assert step.lean.layers[0].qkv.fused is None
    assert model.model.layers[0].self_attn.q_proj.weight.is_contiguous()
    assert_same_logits(steps_of(step, decode_steps=3), steps_of(ModelStep(model, lean=False), decode_steps=3))


def test_a_layout_it_does_not_know_keeps_transformers_forward():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=512)).eval()
    assert lean_forward_for(model) is None
    step = ModelStep(model)
    assert step.lean is None and step.graphs is None and step.describe() == "transformers' forward"
    assert len(steps_of(step, decode_steps=2)) == len(PROMPTS) + 2


def test_a_rotation_unlike_the_models_own_is_refused(monkeypatch):
    """The lean rotary step is checked against the model's own apply_rotary_pos_emb: a model whose rotation
    it does not reproduce keeps transformers' forward."""
    import transformers.models.llama.modeling_llama as llama

    model = tiny_llama()
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a, **kw: (q * 2, k * 2))
    assert lean_forward_for(model) is None


@pytest.mark.parametrize("make", ["glm", "llama"])
def test_the_lean_forward_runs_under_half_of_transformers_operators(make):
    """The point of it: the host's work per step (on a GPU, a kernel launch per operator). Counted as the
    computing operators one decode step dispatches."""

    class Count(TorchDispatchMode):  # operators that compute (a kernel each on a GPU); views are free
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.__name__.split(".")[0] not in ("lift_fresh", "detach_", "chunk", "split"):
                self.ops += 1
            return func(*args, **(kwargs or {}))

    model = deep_glm() if make == "glm" else tiny_llama(num_hidden_layers=12)
    counts = {}
    for name, step in (("transformers", ModelStep(model, lean=False)), ("lean", ModelStep(model))):
        with torch.inference_mode():
            cache = step.new_cache(len(PROMPTS[0]))
            step.prefill_chunk(PROMPTS[0], cache, 0)
            slots = SlotCache()
            slots.add(step.prefilled_kv(cache, 0, (0, len(PROMPTS[0]))))
            step.decode([5], slots, [len(PROMPTS[0])])
            with Count() as count:
                step.decode([6], slots, [len(PROMPTS[0]) + 1])
        counts[name] = count.ops
    layers = model.config.num_hidden_layers
    assert counts["lean"] <= counts["transformers"] / 2, counts
    assert counts["lean"] <= 20 * layers + 20, counts


# -- CUDA graphs, with an eager stand-in for the capture ------------------------------------------------------

def eager_capture(run, pool, device):
    """What ``cuda_capture`` does, without CUDA: run once for real, then replay = run again into the output."""
    output = run()
    return Replay(types.SimpleNamespace(replay=lambda: output.copy_(run())), output)


def test_graph_replays_give_the_eager_steps_logits_across_buckets_and_growth(glm):
    """Rows join one by one (buckets 1, 2, 4, 4, 8), leave, and the replies cross span blocks and the slots'
    first capacity (the buffers grow: every graph is captured again over the new ones)."""
    eager, graphed = ModelStep(glm), ModelStep(glm)
    captured = DecodeGraphs(graphed.lean, capture=eager_capture)
    graphed.graphs = captured
    prompts = [list(range(5 + i, 30 + 9 * i)) for i in range(5)]
    caches = {name: SlotCache() for name in ("eager", "graphed")}
    lengths: list[int] = []
    shapes = set()
    with torch.inference_mode():
        for t in range(300):
            if t % 9 == 0 and t // 9 < len(prompts):  # a new request joins
                prompt = prompts[t // 9]
                for name, step in (("eager", eager), ("graphed", graphed)):
                    cache = step.new_cache(len(prompt))
                    step.prefill_chunk(prompt, cache, 0)
                    caches[name].add(step.prefilled_kv(cache, 0, (0, len(prompt))))
                lengths.append(len(prompt))
            if t == 150:  # the first and third leave
                for cache in caches.values():
                    cache.keep([1, 3, 4])
                lengths = [lengths[i] for i in (1, 3, 4)]
            tokens = [(t + i) % 250 + 3 for i in range(len(lengths))]
            expected = eager.decode(tokens, caches["eager"], lengths)
            got = graphed.decode(tokens, caches["graphed"], lengths)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            cache = caches["graphed"]  # the shape this step ran: its buffers (after any growth), rows, span
            span = cache.span_for(max(lengths) + 1)
            shapes.add((bucket(len(lengths)), min(cache.capacity, bucket(span)), cache.version))
            lengths = [n + 1 for n in lengths]
    assert captured.usable
    assert caches["graphed"].version > 1, "the slots grew during the run"
    assert captured.captures == len(shapes), "one capture per (rows, span) bucket over each set of buffers"
    assert {s[0] for s in shapes} >= {1, 2, 4, 8}


def test_a_capture_that_fails_leaves_the_step_eager(glm, caplog):
    def failing(run, pool, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    step = ModelStep(glm)
    step.graphs = DecodeGraphs(step.lean, capture=failing)
    reference = ModelStep(glm, lean=False)
    assert_same_logits(steps_of(step, decode_steps=3), steps_of(reference, decode_steps=3))
    assert not step.graphs.usable
    assert "decode step not captured" in caplog.text


def test_graphs_are_on_by_default_only_on_cuda(glm):
    assert ModelStep(glm).graphs is None
    assert ModelStep(glm, graphs=False).graphs is None
    assert graphs_module.bucket(1) == 1 and graphs_module.bucket(5) == 8 and graphs_module.bucket(8) == 8


# -- sampling without host waits --------------------------------------------------------------------------

class Syncs(TorchDispatchMode):
    """Records the operators that make the host wait for a device: reading a value back (item, bool, if)."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(("_local_scalar_dense", "item")) or func is torch.ops.aten.is_nonzero.default:
            self.waits.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_sampling_for_a_device_reads_nothing_back_before_the_chosen_ids():
    logits = torch.randn(4, 3000) * 3
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, repetition_penalty=r, seed=i)
              for i, (t, p, k, r) in enumerate([(0.8, 0.8, 0, 1.0), (1.0, 1.0, 0, 1.3), (0.7, 0.5, 20, 1.0),
                                                (0.0, 1.0, 0, 1.0)])]
    seen = [None, torch.tensor([1, 2, 3]), None, None]

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(4)]

    with Syncs() as device_path:
        on_device = choose_tokens(logits.clone(), params, generators(), seen, sort_all=True)
    assert device_path.waits == [], "sampling on a GPU would wait for it at: " + ", ".join(device_path.waits)
    assert on_device == choose_tokens(logits.clone(), params, generators(), seen, sort_all=False)
    flat = torch.zeros(2, 3000)  # nucleus beyond the top 64: the CPU's shortcut falls back to a full sort
    flat_params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(2)]
    assert (choose_tokens(flat.clone(), flat_params, generators()[:2], [None, None], sort_all=True)
            == choose_tokens(flat.clone(), flat_params, generators()[:2], [None, None], sort_all=False))
    with Syncs() as cpu_path:  # where checking costs nothing, the CPU still takes its shortcut
        choose_tokens(logits.clone(), params, generators(), seen)
    assert cpu_path.waits


def test_an_engine_replaying_graphs_gives_the_eager_engines_replies_burst_after_burst(glm):
    """The scheduler with graphs: seeded replies of requests joining and leaving equal the eager engine's, and the
    slots stay between bursts (the graphs read them): a second burst of the same shape captures nothing new."""
    from chatglm_web.engine.events import Token
    from chatglm_web.engine.scheduler import Engine

    def replies(engine, count: int) -> list[list[int]]:
        params = [SamplingParams(seed=s, temperature=0.9, top_p=0.9, max_new_tokens=40 + 15 * s) for s in range(3)]
        requests = [engine.submit(PROMPTS[i], params[i], []) for i in range(count)]
        return [[e.id for e in request if isinstance(e, Token)] for request in requests]

    eager, graphed = Engine(glm, max_batch_size=4), Engine(glm, max_batch_size=4)
    graphed.step.graphs = DecodeGraphs(graphed.step.lean, capture=eager_capture)
    try:
        assert replies(graphed, 3) == replies(eager, 3)
        assert graphed.step.keeps_slots
        alone = replies(eager, 1)
        assert replies(graphed, 1) == alone  # one row: the same shapes every time
        captured = graphed.step.graphs.captures
        assert replies(graphed, 1) == alone
        assert graphed.step.graphs.captures == captured, "the second burst replays the first one's graphs"
    finally:
        eager.shutdown()
        graphed.shutdown()
