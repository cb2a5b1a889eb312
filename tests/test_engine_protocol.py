"""Every engine offers the surface ``LocalBackend`` relies on (``chatglm_web.engine.protocol.GenerationEngine``):
the scheduler, the engine process, ZeroGPU's engine and the tests' scripted engine. Checked member by member,
with each method's parameters, so a renamed or missing one fails here and not in a page test."""

from __future__ import annotations

import inspect
import typing

import pytest

from chatglm_web.engine.process import EngineProcess
from chatglm_web.engine.protocol import GenerationEngine
from chatglm_web.engine.scheduler import Engine
from chatglm_web.engine.zero_gpu import ZeroGPUEngine
from scripted_engine import ScriptedEngine

ENGINES = [Engine, EngineProcess, ZeroGPUEngine, ScriptedEngine]


def protocol_members() -> dict[str, object]:
    members = {name: value for name, value in vars(GenerationEngine).items()
               if not name.startswith("_") and (callable(value) or isinstance(value, property))}
    members.update({name: None for name in typing.get_type_hints(GenerationEngine)})
    return members


def test_the_protocol_names_what_the_local_backend_uses():
    assert set(protocol_members()) == {"submit", "load", "alive", "check_capacity", "shutdown", "admission",
                                       "context_length"}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.__name__)
def test_each_engine_has_every_member_with_its_parameters(engine):
    instance_attributes = set()
    for klass in engine.__mro__:  # attributes set in __init__ count as members
        init = vars(klass).get("__init__")
        if inspect.isfunction(init):
            source = inspect.getsource(init)
            instance_attributes |= {name for name in protocol_members() if f"self.{name} =" in source}
    for name, member in protocol_members().items():
        assert hasattr(engine, name) or name in instance_attributes, f"{engine.__name__} lacks {name}"
        if callable(member) and not isinstance(member, property):
            wanted = list(inspect.signature(member).parameters)[1:]
            have = inspect.signature(getattr(engine, name)).parameters
            assert list(have)[1:len(wanted) + 1] == wanted, f"{engine.__name__}.{name}{inspect.signature(getattr(engine, name))}"
            extra = [p for p in list(have.values())[len(wanted) + 1:] if p.default is inspect.Parameter.empty]
            assert not extra, f"{engine.__name__}.{name} needs more than the protocol passes: {extra}"


def test_a_missing_member_is_seen():
    class Incomplete:
        admission = context_length = alive = load = None

        def submit(self, prompt_ids, params, stop_ids=()):
            pass

    with pytest.raises(AssertionError, match="lacks check_capacity"):
        test_each_engine_has_every_member_with_its_parameters(Incomplete)


def test_events_and_pipe_messages_cross_a_process_boundary_as_data():
    """What the engine process sends: typed events inside typed messages, equal after pickling, and the finish
    reason still the enum (not a bare string) on the other side."""
    import pickle

    from chatglm_web.engine.events import Done, QueuePosition, Token
    from chatglm_web.engine.process import Cancel, Events, Submit
    from chatglm_web.generation import FinishReason, SamplingParams

    sent = [Events([(1, QueuePosition(2)), (1, Token(42)), (1, Done("error", "boom")), (2, Done(FinishReason.STOP))]),
            Submit(3, [5, 6, 7], SamplingParams(seed=1), (2,)), Cancel(3)]
    received = [pickle.loads(pickle.dumps(message)) for message in sent]
    assert received == sent
    assert [type(event) for _, event in received[0].events] == [QueuePosition, Token, Done, Done]
    assert all(type(event.reason) is FinishReason for _, event in received[0].events if isinstance(event, Done))
    with pytest.raises(ValueError):
        Done("finished for no reason")
