"""The epoch order: a seeded permutation, optionally grouped by length."""

import torch

from cofi.batching import GROUP_WINDOW_BATCHES, epoch_order


def lengths_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_plain_order_is_a_seeded_permutation():
    a, b = epoch_order(100, 0, 7), epoch_order(100, 0, 7)
    assert torch.equal(a, b)
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, 1, 7))


def test_grouped_order_is_a_permutation_with_less_padding():
    n, batch_size = 5 * GROUP_WINDOW_BATCHES * 8 + 5, 8  # a short last batch
    lengths = lengths_of(n)
    grouped = epoch_order(n, 3, 42, lengths, batch_size)
    assert torch.equal(grouped, epoch_order(n, 3, 42, lengths, batch_size))  # resumable
    assert sorted(grouped.tolist()) == list(range(n))

    def padded_tokens(order: torch.Tensor) -> int:
        return sum(max(lengths[i] for i in batch) * len(batch) for batch in order.split(batch_size))

    plain = epoch_order(n, 3, 42)
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    assert len(grouped.split(batch_size)[-1]) == 5  # the short batch stays last


def test_grouped_batches_come_from_one_window_and_are_shuffled():
    n, batch_size = 4 * GROUP_WINDOW_BATCHES * 4, 4
    lengths = list(range(n))  # distinct lengths: a batch's members are identifiable
    order = epoch_order(n, 0, 1, lengths, batch_size)
    batches = order.view(-1, batch_size)
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches.tolist())  # sorted within a batch
    maxima = [max(lengths[i] for i in b) for b in batches.tolist()]
    assert maxima != sorted(maxima, reverse=True)  # batch order is shuffled, not a length curriculum


def test_the_collator_pads_to_the_bucket_of_the_longest_example():
    from cofi.batching import Collator

    examples = [{"input_ids": [5] * n, "label": 1} for n in (3, 17)]
    assert Collator(0)(examples)["input_ids"].shape == (2, 17)
    batch = Collator(0, pad_to_multiple=16)(examples)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [3, 17]  # padding is masked
    assert (batch["input_ids"][1, 17:] == 0).all()
    assert Collator(0, pad_to_multiple=16)([{"input_ids": [5] * 16}])["input_ids"].shape == (1, 16)
