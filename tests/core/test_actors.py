"""The Ray actor layer: Ray mode reproduces local mode, data parallelism, ActorGroup basics."""

from __future__ import annotations

import os

import pytest

from twinkle.types import AdamParams, Datum, LoraConfig, SamplingParams

pytestmark = pytest.mark.usefixtures("local_ray")

TEXTS = [
    "The cat sat on the mat.",
    "A long time ago, in a valley far away, there lived an old cartographer with his maps.",
    "def add(x, y):\n    return x + y",
    "Bonjour le monde, ça va? 中文",
    "User: What is 2 + 2?\nAssistant: 4.",
    "Palm trees gave way to olive groves, then to bare hills.",
    "User: Hello!\nAssistant: Hi! How can I help?",
    "An old man across the aisle peeled an orange with a pocketknife.",
]
STEPS = 5


def _training_script(backend) -> dict:
    """A fixed-seed script: create a model, 5 x (forward_backward + step), then sample with a seed."""
    from twinkle import TrainingModel

    model = TrainingModel("twinkle-tiny", LoraConfig(rank=8, seed=21), optimizer=AdamParams(learning_rate=1e-2),
                          backend=backend)
    tok = model.get_tokenizer()
    data = [Datum.from_sequence(tok.encode(t)) for t in TEXTS]
    batches = [data[:4], data[4:], data[2:6]]
    losses, grad_norms = [], []
    for i in range(STEPS):
        fb = model.forward_backward(batches[i % len(batches)])
        step = model.step()
        losses.append(fb.result().metrics["loss:sum"])
        grad_norms.append(step.result().metrics["grad_norm"])
    prompt = tok.encode("User: Hello!\nAssistant:")
    result = model.sampler().sample(prompt, SamplingParams(max_tokens=8, seed=5, stop=[]), num_samples=2).result()
    state = model.train_state().result()
    return {"model_id": model.model_id, "losses": losses, "grad_norms": grad_norms,
            "tokens": [s.tokens for s in result.sequences],
            "logprobs": [s.logprobs for s in result.sequences], "state": state}


@pytest.fixture(scope="module")
def in_process(state_dir) -> dict:
    import torch

    from twinkle.api.local import LocalBackend

    # a worker computes with every core (workers._worker_threads); so does this reference, whatever
    # thread count an earlier test left this process with: the same sums in the same order
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    backend = LocalBackend(state_dir)
    try:
        return _training_script(backend)
    finally:
        backend.close()
        torch.set_num_threads(threads)


def _placement_group_state(ray, pg) -> str:
    return ray.util.placement_group_table(pg)["state"]


def test_ray_mode_matches_in_process_bit_for_bit(state_dir, in_process, local_ray):
    from twinkle.api.local import LocalBackend

    backend = LocalBackend(state_dir, use_ray=True)
    try:
        got = _training_script(backend)
        groups = list(backend._groups)
        assert len(groups) == 1 and groups[0].num_workers == 1
        pid = local_ray.get(groups[0].call_first("ready"))["pid"]
        assert pid != os.getpid()  # the engine really ran in an actor
    finally:
        backend.close()
    assert got["losses"] == in_process["losses"]  # bit-identical
    assert got["grad_norms"] == in_process["grad_norms"]
    assert got["tokens"] == in_process["tokens"]
    assert got["logprobs"] == in_process["logprobs"]
    assert got["state"] == in_process["state"]
    assert all(_placement_group_state(local_ray, g.placement_group) == "REMOVED" for g in groups)
    assert all(g.actors == [] for g in groups)


@pytest.fixture(scope="module")
def data_parallel(state_dir, local_ray) -> dict:
    """The same script on a group of 2 TrainWorkers (data parallel), plus what the group looked like."""
    from twinkle.api.local import LocalBackend

    backend = LocalBackend(state_dir, use_ray=True, num_workers=2)
    try:
        got = _training_script(backend)
        groups = list(backend._groups)
        got["num_workers"] = [g.num_workers for g in groups]
        got["ready"] = local_ray.get(groups[0].call_all("ready"))
        got["weights"] = local_ray.get(groups[0].call_all("call", "adapter_weights", got["model_id"]))
    finally:
        backend.close()
    got["pg_states"] = [_placement_group_state(local_ray, g.placement_group) for g in groups]
    return got


def test_two_data_parallel_workers_match_single_process(data_parallel, in_process):
    got = data_parallel
    assert got["num_workers"] == [2]
    assert sorted(r["rank"] for r in got["ready"]) == [0, 1]
    assert len({r["pid"] for r in got["ready"]}) == 2
    # loss:sum of the two shards equals the single-process loss of the whole batch
    assert got["losses"] == pytest.approx(in_process["losses"], rel=1e-4)
    assert got["grad_norms"] == pytest.approx(in_process["grad_norms"], rel=1e-4)  # of the summed gradients
    assert got["state"].step == STEPS
    # both ranks hold the same adapter weights after the all-reduced steps
    rank0, rank1 = got["weights"]
    assert rank0.keys() == rank1.keys()
    assert all((rank0[k] == rank1[k]).all() for k in rank0)
    assert got["pg_states"] == ["REMOVED"]


def test_data_parallel_train_state_counts_the_whole_batch(data_parallel, in_process):
    """Progress counters describe the model, not one rank's shard: same as with one process."""
    got, want = data_parallel["state"], in_process["state"]
    assert (got.step, got.micro_batches) == (want.step, want.micro_batches)
    assert got.consumed_samples == want.consumed_samples
    assert got.consumed_tokens == want.consumed_tokens


# ------------------------------------------------------------- ActorGroup
class EchoWorker:
    """A tiny worker: remembers its rank and an init argument."""

    def __init__(self, rank: int, world_size: int, tag: str = "") -> None:
        self.rank = rank
        self.world_size = world_size
        self.tag = tag
        self.calls = 0

    def whoami(self) -> dict:
        self.calls += 1
        return {"rank": self.rank, "world_size": self.world_size, "tag": self.tag, "pid": os.getpid(),
                "calls": self.calls}

    def add(self, a: int, b: int = 0) -> int:
        return 100 * self.rank + a + b


class RankedEchoWorker(EchoWorker):
    """An EchoWorker that takes part in the group's rank setup (as TrainWorker does with torch.distributed)."""

    def distributed_address(self) -> str:
        return f"echo://rank{self.rank}"

    def init_distributed(self, address: str) -> None:
        self.address = address

    def group_address(self) -> str:
        return self.address


class FailingSetupWorker(RankedEchoWorker):
    def init_distributed(self, address: str) -> None:
        raise RuntimeError("rank setup failed")


@pytest.fixture
def pickle_by_value(local_ray):
    """Worker classes of this module are pickled by value, so Ray workers need not import the module."""
    import sys

    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture
def echo_cls(pickle_by_value):
    return EchoWorker


@pytest.fixture
def ranked_echo_cls(pickle_by_value):
    return RankedEchoWorker


@pytest.fixture
def failing_setup_cls(pickle_by_value):
    return FailingSetupWorker


def test_actor_group_calls(local_ray, echo_cls):
    """A group of any worker class: every rank gets (rank, world_size, **init_kwargs)."""
    from twinkle.actors import ActorGroup

    group = ActorGroup(echo_cls, 3, cpus_per_worker=0.5, init_kwargs={"tag": "hello"})
    try:
        assert group.num_workers == 3 and len(group.actors) == 3
        everyone = local_ray.get(group.call_all("whoami"))
        assert [w["rank"] for w in everyone] == [0, 1, 2]
        assert {w["world_size"] for w in everyone} == {3}
        assert {w["tag"] for w in everyone} == {"hello"}
        assert len({w["pid"] for w in everyone}) == 3 and os.getpid() not in {w["pid"] for w in everyone}

        first = local_ray.get(group.call_first("whoami"))
        assert first["rank"] == 0 and first["calls"] == 2  # actors keep state between calls
        assert [w["calls"] for w in local_ray.get(group.call_all("whoami"))] == [3, 2, 2]

        assert local_ray.get(group.call_all("add", 1, b=2)) == [3, 103, 203]
        assert local_ray.get(group.call_first("add", 5)) == 5
        shards = [((10,), {}), ((20,), {"b": 1}), ((30,), {"b": 2})]
        assert local_ray.get(group.call_sharded("add", shards)) == [10, 121, 232]
        with pytest.raises(ValueError):
            group.call_sharded("add", shards[:2])
    finally:
        group.shutdown()


def test_actor_group_shutdown_removes_actors_and_placement_group(local_ray, ranked_echo_cls):
    from ray.exceptions import RayActorError

    from twinkle.actors import ActorGroup

    group = ActorGroup(ranked_echo_cls, 2, cpus_per_worker=0.5)
    actors = list(group.actors)
    pg = group.placement_group
    assert local_ray.get(group.call_all("add", 1)) == [1, 101]
    assert local_ray.get(group.call_all("group_address")) == ["echo://rank0"] * 2  # rank 0's address for all
    assert _placement_group_state(local_ray, pg) == "CREATED"

    group.shutdown()
    assert group.actors == []
    assert _placement_group_state(local_ray, pg) == "REMOVED"
    for actor in actors:
        with pytest.raises(RayActorError):
            local_ray.get(actor.add.remote(1), timeout=60)
    group.shutdown()  # idempotent


def test_actor_group_rejects_bad_sizes(local_ray, echo_cls):
    from twinkle.actors import ActorGroup

    with pytest.raises(ValueError):
        ActorGroup(echo_cls, 0)
    with pytest.raises(RuntimeError, match="could not place"):
        ActorGroup(echo_cls, 2, cpus_per_worker=1000.0, ready_timeout_s=1.0)


def test_failed_group_setup_releases_its_placement_group(local_ray, failing_setup_cls):
    from twinkle.actors import ActorGroup

    def created() -> set[str]:
        return {pg_id for pg_id, pg in local_ray.util.placement_group_table().items() if pg["state"] == "CREATED"}

    before = created()
    with pytest.raises(Exception, match="rank setup failed"):
        ActorGroup(failing_setup_cls, 2, cpus_per_worker=0.5)
    assert created() == before, "a group that failed to start must remove its placement group"
