"""The scheduler's parts on their own: seq_id ordering with deadlines, how the train lane forms
batches, and token-fair sharing between tenants."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from twinkle.actors.fairness import DeficitRoundRobin
from twinkle.actors.lanes import SampleLane, TrainLane
from twinkle.actors.ordering import SeqOrdering
from twinkle.actors.work import WorkItem
from twinkle.types import Datum


def _fb(tenant: str, model: str, seq: int, tokens: int = 10) -> WorkItem:
    data = [Datum(input_tokens=np.zeros(tokens, dtype=np.int64), loss_inputs={})]
    return WorkItem(f"{model}-{seq}", tenant, "forward_backward", model, SimpleNamespace(data=data), seq_id=seq,
                    ordered=True)


def _op(tenant: str, model: str, seq: int, method: str = "step") -> WorkItem:
    return WorkItem(f"{model}-{seq}", tenant, method, model, SimpleNamespace(), seq_id=seq, ordered=True)


async def _never(batch):  # lanes under test only form batches
    raise AssertionError("not executed in these tests")


def _train_lane(budget: int = 10_000, **kwargs) -> TrainLane:
    return TrainLane(_never, lambda item, outcome: None, budget=budget, max_models=64, **kwargs)


# ------------------------------------------------------------------ ordering
def test_requests_run_in_seq_order_and_a_missing_seq_id_times_out():
    async def scenario():
        released = []
        ordering = SeqOrdering(0.2, released.append)
        ordering.add(_fb("a", "m", 3))
        ordering.add(_fb("a", "m", 1))
        assert [i.seq_id for i in released] == []  # waiting for 0
        ordering.add(_fb("a", "m", 0))
        assert [i.seq_id for i in released] == [0, 1]  # 2 is missing
        assert ordering.waiting() == {"m": 2}
        ordering.skip("m", 2)  # rejected before it reached the scheduler
        assert [i.seq_id for i in released] == [0, 1, 3]
        ordering.add(_fb("a", "m", 5))  # 4 never comes: the deadline releases 5
        await asyncio.sleep(0.5)
        assert [i.seq_id for i in released] == [0, 1, 3, 5]
        ordering.add(_fb("a", "m", 4))  # arrives late: runs at once rather than never
        assert [i.seq_id for i in released] == [0, 1, 3, 5, 4]
        assert ordering.waiting() == {}

    asyncio.run(scenario())


def test_each_model_waits_only_for_its_own_gaps():
    async def scenario():
        released = []
        ordering = SeqOrdering(60.0, released.append)
        ordering.add(_fb("a", "m1", 1))
        ordering.add(_fb("b", "m2", 0))
        ordering.add(_fb("b", "m2", 1))
        assert [(i.target_id, i.seq_id) for i in released] == [("m2", 0), ("m2", 1)]

    asyncio.run(scenario())


# ------------------------------------------------------------------ train lane
def test_a_pass_gathers_every_models_forward_requests_up_to_its_step():
    async def scenario():
        lane = _train_lane()
        for item in [_fb("a", "m1", 1), _fb("a", "m1", 2), _op("a", "m1", 3), _fb("a", "m1", 4),
                     _fb("b", "m2", 1), _op("b", "m2", 2), _fb("c", "m3", 1)]:
            lane.push(item)
        batch = lane.next_batch()
        assert batch.kind == "pass"
        assert [i.request_id for i in batch.items] == ["m1-1", "m1-2", "m2-1", "m3-1"]
        batch = lane.next_batch()  # the steps that closed m1's and m2's parts, together
        assert batch.kind == "ops" and {i.request_id for i in batch.items} == {"m1-3", "m2-2"}
        batch = lane.next_batch()
        assert [i.request_id for i in batch.items] == ["m1-4"]
        assert lane.queued() == 0

    asyncio.run(scenario())


def test_time_sliced_lane_runs_one_request_per_pass():
    async def scenario():
        lane = _train_lane(time_sliced=True)
        for item in [_fb("a", "m1", 1), _fb("b", "m2", 1), _fb("c", "m3", 1)]:
            lane.push(item)
        sizes = [len(lane.next_batch().items) for _ in range(3)]
        assert sizes == [1, 1, 1] and lane.queued() == 0

    asyncio.run(scenario())


def test_a_pass_respects_the_token_budget_and_keeps_model_order():
    async def scenario():
        lane = _train_lane(budget=100)
        for seq in range(5):
            lane.push(_fb("a", "m1", seq, tokens=30))
        lane.push(_fb("b", "m2", 0, tokens=30))
        first = lane.next_batch().items
        assert sum(i.cost for i in first) <= 100
        assert "m2-0" in [i.request_id for i in first]  # the small tenant is not starved by the big one
        m1 = [i.seq_id for i in first if i.target_id == "m1"]
        assert m1 == list(range(len(m1)))  # a prefix, in order

    asyncio.run(scenario())


def test_sample_lane_batches_samples_of_many_samplers():
    async def scenario():
        lane = SampleLane(_never, lambda item, outcome: None, budget=10_000)
        for sampler in ("s1", "s2", "s3"):
            args = SimpleNamespace(prompt_tokens=[1, 2, 3], num_samples=2, params=SimpleNamespace(max_tokens=8))
            lane.push(WorkItem(f"{sampler}-x", "t-" + sampler, "sample", sampler, args))
        batch = lane.next_batch()
        assert batch.kind == "sample" and len(batch.items) == 3

    asyncio.run(scenario())


# ------------------------------------------------------------------ fairness
def test_deficit_round_robin_shares_tokens_not_requests():
    fairness = DeficitRoundRobin()
    served = {"big": 0, "small": 0}
    for _ in range(300):
        waiting = {"big": [(1000, "big")] * 4, "small": [(100, "small")] * 40}
        for tenant in fairness.pick(waiting, budget=1000):
            served[tenant] += 1000 if tenant == "big" else 100
    ratio = served["big"] / served["small"]
    assert 0.8 < ratio < 1.25, served  # equal tokens, although "big" sends 10x larger requests


def test_a_request_larger_than_the_budget_still_runs():
    fairness = DeficitRoundRobin()
    ran = False
    for _ in range(10):
        chosen = fairness.pick({"huge": [(5000, "huge")], "small": [(10, "small")] * 5}, budget=1000)
        ran = ran or "huge" in chosen
    assert ran
