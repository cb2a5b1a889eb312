"""What every engine offers a backend: the scheduler here (``scheduler.Engine``), the engine in its own
process (``process.EngineProcess``), ZeroGPU's (``zero_gpu.ZeroGPUEngine``), and the tests' scripted
engine. ``backends.local.LocalBackend`` uses nothing else; ``tests/test_engine_protocol.py`` checks each
of them against it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from chatglm_web.engine.admission import AdmissionPolicy
from chatglm_web.engine.request import GenerationRequest
from chatglm_web.generation import SamplingParams


@runtime_checkable
class GenerationEngine(Protocol):
    admission: AdmissionPolicy  # how many run and wait (the busy message beyond)
    context_length: int  # the longest sequence, prompt and reply together

    def submit(self, prompt_ids: list[int], params: SamplingParams, stop_ids=()) -> GenerationRequest:
        """Queue a generation; ``EngineBusy`` at once when the line is full."""

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting)."""

    @property
    def alive(self) -> bool:
        """It can serve (not shut down, its worker or process not dead)."""

    def check_capacity(self) -> None:
        """Raise ``EngineBusy`` if a submit now would be refused."""

    def shutdown(self) -> None:
        """End every request and stop."""
