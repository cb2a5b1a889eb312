"""The admission line a remote backend uses: the engine's limits, positions only on change, no lost place."""

from __future__ import annotations

import asyncio

import pytest

from chatglm_web.engine.admission import AdmissionLine, AdmissionPolicy, EngineBusy


def test_running_then_waiting_then_busy_with_the_engines_message():
    async def scenario():
        line = AdmissionLine(AdmissionPolicy(max_running=2, max_waiting=1))
        places = [line.join() for _ in range(3)]
        assert [p.admitted for p in places] == [True, True, False]
        with pytest.raises(EngineBusy, match="2 replies are being written and 1 are waiting"):
            line.join()
        for place in places:
            place.leave()
        assert (line.running, line.waiting) == (0, 0)

    asyncio.run(scenario())


def test_positions_are_sent_when_they_change_and_slots_pass_in_order():
    async def scenario():
        line = AdmissionLine(AdmissionPolicy(max_running=1, max_waiting=3))
        holder = line.join()
        waiting = [line.join() for _ in range(3)]
        seen = {i: [] for i in range(3)}
        admitted_order = []

        async def wait(i):
            async for position in waiting[i].wait():
                seen[i].append(position)
            admitted_order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0)
        waiting[1].leave()  # the second gives up while waiting: the third moves up
        await asyncio.sleep(0)
        holder.leave()
        await asyncio.sleep(0)
        waiting[0].leave()
        await asyncio.gather(tasks[0], tasks[2])
        tasks[1].cancel()
        assert seen[0] == [1] and seen[2] == [3, 2, 1]
        assert admitted_order == [0, 2]
        waiting[2].leave()
        assert (line.running, line.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_slot_freed_while_the_waiting_consumer_is_busy_is_not_missed():
    async def scenario():
        line = AdmissionLine(AdmissionPolicy(max_running=1, max_waiting=1))
        holder, waiting = line.join(), line.join()
        positions = waiting.wait()
        assert await anext(positions) == 1
        holder.leave()  # while the consumer is away from its generator (e.g. sending the position to a page)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(positions), 5)
        assert waiting.admitted
        waiting.leave()

    asyncio.run(scenario())
