"""The step plan both stages share: shards, laziness, resumption, and stage 1's length grouping."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from stmed.train.stage import StepPlan, TrainConfig, plan_steps


class _Echo(torch.utils.data.Dataset):
    """A dataset whose item is its own key."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def _eager_keys(plan: StepPlan, step: int) -> list[tuple[int, int]]:
    """A step's keys drawn from scratch, one permutation per step: the plan's definition, spelled out."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    order = torch.randperm(plan.num_samples, generator=torch.Generator().manual_seed(plan.seed + epoch))
    per_step = plan.micro_batch_size * plan.grad_accum_steps
    return [(epoch, i) for i in order[plan.rank :: plan.world_size].tolist()[within * per_step :][:per_step]]


def _steps(plan: StepPlan, start: int, stop: int) -> list[list[list[tuple[int, int]]]]:
    """The plan's micro-batches for steps ``start .. stop - 1``, one list of micro-batches per step."""
    micro = list(plan.micro_batches(start, stop))
    return [micro[i : i + plan.grad_accum_steps] for i in range(0, len(micro), plan.grad_accum_steps)]


def _padding(micro_batch: list[tuple[int, int]], lengths: list[int]) -> int:
    """Pad positions of one right-padded micro-batch: rows x its longest row, less the real tokens."""
    sizes = [lengths[index] for _, index in micro_batch]
    return max(sizes) * len(sizes) - sum(sizes)


def test_step_plan_shards_are_disjoint_and_reproducible():
    plans = [StepPlan(10, rank, 2, micro_batch_size=2, grad_accum_steps=1, seed=3) for rank in (0, 1)]
    assert plans[0].steps_per_epoch == 2
    epoch0 = [[key for batch in plan.micro_batches(0, 2) for key in batch] for plan in plans]
    assert not set(epoch0[0]) & set(epoch0[1]) and all(e == 0 for e, _ in epoch0[0])
    # Resuming at step 1 yields exactly the tail of the unbroken stream; step 2 starts epoch 1.
    assert list(plans[0].micro_batches(1, 3)) == list(plans[0].micro_batches(0, 3))[1:]
    assert {e for batch in plans[0].micro_batches(2, 3) for e, _ in batch} == {1}


def test_the_plan_is_lazy_one_permutation_per_epoch_whatever_the_length_of_the_run(monkeypatch):
    draws = []
    real_randperm = torch.randperm

    def counted(*args, **kwargs):
        draws.append(args[0])
        return real_randperm(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counted)
    plan = StepPlan(1000, 1, 2, micro_batch_size=2, grad_accum_steps=2, seed=7, lengths=tuple(range(1000)))
    assert plan.steps_per_epoch == 125
    for total in (10**6, 10**12):  # the start costs the same however long the run
        keys = plan.micro_batches(500_000, total)
        assert draws == []  # nothing is drawn before the first key is asked for
        first_steps = list(itertools.islice(keys, 2 * 10))
        assert draws == [1000] and {e for batch in first_steps for e, _ in batch} == {4000}
        draws.clear()
    # Two epochs and a step: three permutations, not one per step (251).
    list(plan.micro_batches(0, 251))
    assert len(draws) == 3
    draws.clear()
    # The loader takes the keys as they come; building it draws nothing.
    batches = plan.batches(_Echo(), 10**9, 10**9 + 3, collate_fn=lambda items: items)
    assert draws == []
    assert next(batches) == next(plan.micro_batches(10**9, 10**9 + 3)) and len(draws) == 2
    assert {epoch for epoch, _ in next(batches)} == {10**9 // 125}


@pytest.mark.parametrize("grouped", [False, True])
def test_resuming_at_any_step_replays_the_unbroken_stream_and_the_per_step_definition(grouped):
    lengths = tuple(random.Random(0).randint(20, 400) for _ in range(50))
    plan = StepPlan(
        50, 1, 3, micro_batch_size=2, grad_accum_steps=2, seed=5, lengths=lengths if grouped else None
    )
    assert plan.steps_per_epoch == 4
    unbroken = _steps(plan, 0, 13)  # three epochs and a step
    for start in range(13):
        assert _steps(plan, start, 13) == unbroken[start:], start
    for step, micro in enumerate(unbroken):
        keys, expected = [key for batch in micro for key in batch], _eager_keys(plan, step)
        # Ungrouped, the keys are exactly the per-step definition; grouped, the same keys reordered.
        assert sorted(keys) == sorted(expected) if grouped else keys == expected


def test_grouping_keeps_each_step_s_samples_and_pads_less():
    lengths = [random.Random(i).randint(80, 2048) for i in range(64)]
    plain = StepPlan(64, 0, 2, micro_batch_size=4, grad_accum_steps=4, seed=0)
    grouped = StepPlan(64, 0, 2, micro_batch_size=4, grad_accum_steps=4, seed=0, lengths=tuple(lengths))
    pad = {False: 0, True: 0}
    for step_plain, step_grouped in zip(_steps(plain, 0, 4), _steps(grouped, 0, 4), strict=True):
        keys = [key for batch in step_grouped for key in batch]
        plain_keys = [key for batch in step_plain for key in batch]
        assert sorted(keys) == sorted(plain_keys)  # the same samples, each once
        assert len(set(keys)) == 16 and [len(batch) for batch in step_grouped] == [4, 4, 4, 4]
        sizes = [lengths[i] for _, i in keys]
        assert sizes == sorted(sizes, reverse=True)  # longest first
        pad[False] += sum(_padding(batch, lengths) for batch in step_plain)
        pad[True] += sum(_padding(batch, lengths) for batch in step_grouped)
    real = sum(lengths[i] for step in _steps(plain, 0, 4) for batch in step for _, i in batch)
    # 16 lengths uniform in 80..2048 per step, in micro-batches of 4: ungrouped pads about half as many
    # positions as there are real tokens (32359 to 66125 here), grouped about a fifth (12207).
    assert pad[True] < 0.5 * pad[False], (pad, real)
    assert pad[False] > 0.4 * real > 2 * pad[True]

    # Two long and two short samples in one step: grouped, nothing pads at all.
    two_sizes = StepPlan(4, 0, 1, micro_batch_size=2, grad_accum_steps=2, seed=0, lengths=(10, 100, 10, 100))
    micro = list(two_sizes.micro_batches(0, 1))
    assert [[two_sizes.lengths[i] for _, i in batch] for batch in micro] == [[100, 100], [10, 10]]
    assert sum(_padding(batch, [10, 100, 10, 100]) for batch in micro) == 0


def test_plan_steps_groups_only_when_asked_and_given_lengths():
    lengths = [5, 1, 4, 2, 3, 6, 8, 7]
    on = TrainConfig(micro_batch_size=2, grad_accum_steps=2)
    off = TrainConfig(micro_batch_size=2, grad_accum_steps=2, group_by_length=False)
    assert plan_steps(8, on, 0, 1, lengths=lengths)[0].lengths == tuple(lengths)
    assert plan_steps(8, off, 0, 1, lengths=lengths)[0].lengths is None
    assert plan_steps(8, on, 0, 1)[0].lengths is None  # DPO passes none
    plan, total = plan_steps(8, on, 0, 1, lengths=lengths)
    assert total == plan.steps_per_epoch == 2
