"""ArcDataLoader: padding, targets, bucketing, endless epochs, determinism, resumption, ranks."""
import numpy as np
import pytest
import torch

from arc.data import Pair, Task, load_tasks
from arc.loader import ArcDataLoader
from arc.tokens import BLOCK_SIZE, IGNORE_INDEX, N_POS, NO_GRID_POS, PAD, layout_positions


def random_tasks(n: int, seed: int = 0, max_side: int = 12) -> list[Task]:
    rng = np.random.default_rng(seed)

    def grid():
        return rng.integers(0, 10, size=tuple(rng.integers(1, max_side + 1, size=2)))

    return [
        Task(f"t{i:03d}", tuple(Pair(grid(), grid()) for _ in range(rng.integers(2, 5))), (Pair(grid(), grid()),))
        for i in range(n)
    ]


def rows(x: torch.Tensor) -> set[bytes]:
    """The sequences of a batch without their padding (which depends on the batch)."""
    return {r[r != PAD].numpy().tobytes() for r in x}


def test_batches_are_padded_with_pad_and_ignored_targets():
    loader = ArcDataLoader(random_tasks(40), batch_size=4, seed=1)
    for _ in range(12):
        x, y, _ = loader.next_batch()
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape
        assert x.shape[1] % 64 == 0 and x.shape[1] <= BLOCK_SIZE
        assert torch.all(y[x == PAD] == IGNORE_INDEX)
        # targets are the next input token wherever the next token is real
        nxt = x[:, 1:]
        tgt = y[:, :-1]
        mask = (tgt != IGNORE_INDEX) & (nxt != PAD)
        assert mask.any()
        assert torch.equal(tgt[mask], nxt[mask])


def test_iterator_never_ends_and_counts_epochs():
    loader = ArcDataLoader(random_tasks(10), batch_size=4)
    per_epoch = loader.batches_per_epoch()
    it = iter(loader)
    for _ in range(per_epoch * 3 + 1):
        next(it)
    assert loader.epoch == 3


def test_training_epochs_differ_and_evaluation_epochs_repeat():
    tasks = random_tasks(24)
    train = ArcDataLoader(tasks, batch_size=4, train=True, seed=0)
    n = train.batches_per_epoch()
    e0 = [train.next_batch()[0] for _ in range(n)]
    e1 = [train.next_batch()[0] for _ in range(n)]
    assert train.epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(e0, e1))

    val = ArcDataLoader(tasks, batch_size=4, train=False)
    n = val.batches_per_epoch()
    v0 = [val.next_batch()[0] for _ in range(n)]
    v1 = [val.next_batch()[0] for _ in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(v0, v1))


def test_evaluation_split_is_not_augmented():
    tasks = random_tasks(8)
    val = ArcDataLoader(tasks, batch_size=1, train=False, pad_multiple=1)
    plain = ArcDataLoader(tasks, batch_size=1, train=False, augment=False, pad_multiple=1)
    assert all(torch.equal(val.next_batch()[0], plain.next_batch()[0]) for _ in range(8))


def test_deterministic_from_seed():
    tasks = random_tasks(30)
    a = ArcDataLoader(tasks, batch_size=4, seed=7)
    b = ArcDataLoader(tasks, batch_size=4, seed=7)
    c = ArcDataLoader(tasks, batch_size=4, seed=8)
    xs_a = [a.next_batch()[0] for _ in range(10)]
    xs_b = [b.next_batch()[0] for _ in range(10)]
    xs_c = [c.next_batch()[0] for _ in range(10)]
    assert all(torch.equal(p, q) for p, q in zip(xs_a, xs_b))
    assert not all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(xs_a, xs_c))


def test_resumed_loader_sees_the_same_batches_as_an_unbroken_one():
    tasks = random_tasks(20)
    unbroken = ArcDataLoader(tasks, batch_size=3, seed=3)
    expected = [unbroken.next_batch() for _ in range(25)]  # crosses epoch boundaries

    first = ArcDataLoader(tasks, batch_size=3, seed=3)
    for _ in range(11):
        first.next_batch()
    state = first.state_dict()
    resumed = ArcDataLoader(tasks, batch_size=3, seed=3)
    resumed.load_state_dict(state)
    for exp in expected[11:]:
        got = resumed.next_batch()
        assert all(torch.equal(a, b) for a, b in zip(got, exp))

    with pytest.raises(ValueError, match="seed"):
        ArcDataLoader(tasks, batch_size=3, seed=4).load_state_dict(state)


def test_ranks_see_disjoint_shares_of_every_epoch():
    tasks = random_tasks(41)
    single = ArcDataLoader(tasks, batch_size=4, augment=False, seed=5)
    everything = set().union(*(rows(single.next_batch()[0]) for _ in range(single.batches_per_epoch())))
    for epoch in range(2):
        shares = []
        for rank in range(2):
            ld = ArcDataLoader(tasks, batch_size=4, augment=False, seed=5, rank=rank, world_size=2)
            ld.load_state_dict({"epoch": epoch, "position": 0, "seed": 5})
            assert ld.batches_per_epoch() == ArcDataLoader(tasks, batch_size=4, seed=5, rank=1 - rank, world_size=2).batches_per_epoch()
            shares.append(set().union(*(rows(b.x) for b in ld.epoch_batches())))
        assert not shares[0] & shares[1]
        # together they cover the epoch, less at most one batch dropped so ranks stay in step
        assert shares[0] | shares[1] <= everything
        assert len(everything) - len(shares[0] | shares[1]) <= 4


def test_epoch_batches_gives_a_full_pass_each_call():
    loader = ArcDataLoader(random_tasks(20), batch_size=4, augment=False)
    first = [b.x for b in loader.epoch_batches()]
    second = [b.x for b in loader.epoch_batches()]
    assert len(first) == len(second) == loader.batches_per_epoch() and loader.epoch == 1


def test_token_budget_bounds_every_batch():
    loader = ArcDataLoader(random_tasks(60, max_side=20), batch_size=16, max_tokens=4096, seed=2)
    for _ in range(loader.batches_per_epoch()):
        x = loader.next_batch().x
        assert x.numel() <= 4096


def test_length_buckets_keep_arc1_training_batches_mostly_real():
    """The target the issue sets: >= 90% real tokens at B=8 on ARC-AGI-1 training (the seed: 27%)."""
    tasks = load_tasks("arc1", "train")
    bucketed = ArcDataLoader(tasks, batch_size=8, seed=0)
    seed_like = ArcDataLoader(tasks, batch_size=8, seed=0, bucket=False, pad_to_block=True)

    def share(loader):
        real = total = 0
        for x, _, _ in loader.epoch_batches():
            real += int((x != PAD).sum())
            total += x.numel()
        return real / total

    assert share(bucketed) >= 0.90
    assert share(seed_like) < 0.35


def test_batches_carry_each_token_s_2d_positions_and_padding_has_none():
    tasks = random_tasks(12)
    loader = ArcDataLoader(tasks, batch_size=4, augment=False, seed=0)
    x, y, pos = loader.next_batch()
    assert pos.shape == (*x.shape, N_POS)
    for row in range(x.shape[0]):
        real = int((x[row] != PAD).sum())
        ids = x[row, :real].numpy()
        expected, _ = layout_positions(ids)  # the reference parser, from the ids alone
        assert np.array_equal(pos[row, :real].numpy(), expected)
        assert (pos[row, real:] == torch.tensor(NO_GRID_POS)).all()

