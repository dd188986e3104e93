"""plumbing.py: the epoch order (length grouping) and lockstep batches."""

import pytest
import torch

import plumbing


def test_epoch_order_plain_is_the_seeded_shuffle():
    assert plumbing.epoch_order(10, 3, 1) == torch.randperm(10, generator=torch.Generator().manual_seed(3001)).tolist()


def test_epoch_order_groups_by_length():
    lengths = [(7 * i) % 23 for i in range(50)]        # 50 rows, batches of 4: 12 full batches + 2 left over
    order = plumbing.epoch_order(50, 0, 0, lengths=lengths, global_batch_size=4, megabatch=3)
    assert sorted(order) == list(range(50))                                      # each row once per epoch
    assert order == plumbing.epoch_order(50, 0, 0, lengths=lengths, global_batch_size=4, megabatch=3)  # every rank
    assert order != plumbing.epoch_order(50, 0, 1, lengths=lengths, global_batch_size=4, megabatch=3)  # new epoch
    batches = [order[i:i + 4] for i in range(0, 48, 4)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)                   # the longest batch first
    # each batch is a slice of one sorted mega-batch: its rows are neighbours in length within it
    plain = plumbing.epoch_order(50, 0, 0)
    for batch in batches:
        mega = next(plain[lo:lo + 12] for lo in range(0, 48, 12) if set(batch) <= set(plain[lo:lo + 12]))
        ranks = sorted(sorted(mega, key=lambda i: -lengths[i]).index(i) for i in batch)
        assert ranks == list(range(ranks[0], ranks[0] + 4))
    assert set(order[48:]) == set(plain[48:])                  # the incomplete batch stays last (dropped)
    # less padding: right-padded slots of the grouped batches vs the plain shuffle's
    slots = lambda o: sum(4 * max(lengths[i] for i in o[k:k + 4]) for k in range(0, 48, 4))  # noqa: E731
    assert slots(order) < slots(plain)


@pytest.mark.parametrize("n,batch,world", [(13, 4, 2), (8, 4, 2), (1, 4, 3), (0, 2, 2), (80, 16, 1)])
def test_rank_batches_lockstep_and_every_item_once(n, batch, world):
    per_rank = [plumbing.rank_batches(n, batch, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1                   # same number of batches on every rank
    real = [i for batches in per_rank for idx, keep in batches for i, k in zip(idx, keep) if k]
    assert sorted(real) == list(range(n))                         # every item once, repeats flagged


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_transformers(kind):
    """Warmup from lr 0 at step 0, then the decay, step for step as transformers' own schedules."""
    import transformers

    reference = {"cosine": transformers.get_cosine_schedule_with_warmup,
                 "linear": transformers.get_linear_schedule_with_warmup,
                 "constant": lambda o, w, t: transformers.get_constant_schedule(o)}[kind]
    lrs = {}
    for name, make in (("ours", lambda o: plumbing.make_scheduler(o, kind, 3, 20)), ("hf", lambda o: reference(o, 3, 20))):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, lrs[name] = make(optimizer), []
        for _ in range(20):
            lrs[name].append(optimizer.param_groups[0]["lr"])
            optimizer.step(), scheduler.step()
    assert lrs["ours"] == pytest.approx(lrs["hf"], abs=1e-12)
    assert kind == "constant" or lrs["ours"][:4] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])


def test_recipes_and_optional_numbers_on_the_command_line():
    """--recipe paper makes the official values the defaults, a flag beats them, and an optional
    number takes "none" (the paper recipe's threshold 0 replaced by a derived one)."""
    import ppo_lagrangian as P

    toy = plumbing.parse_args(P.Args, [])
    assert (toy.recipe, toy.kl_coeff, toy.threshold) == ("toy", 0.1, None)
    paper = plumbing.parse_args(P.Args, ["--recipe", "paper", "--actor_lr", "2e-5", "--threshold", "none",
                                         "--lambda_max", "None"])
    assert (paper.kl_coeff, paper.actor_lr, paper.threshold, paper.lambda_max) == (0.01, 2e-5, None, None)
    assert "differs from the paper: --actor_lr 2e-05 (paper 1e-05), --threshold None (paper 0)" in plumbing.recipe_line(paper)
    with pytest.raises(plumbing.UserError, match="--dataset my.jsonl is not the toy world's data: choose --recipe paper"):
        plumbing.parse_args(P.Args, ["--dataset", "my.jsonl"])
    with pytest.raises(plumbing.UserError, match="unrecognized arguments: --bogus"):
        plumbing.parse_args(P.Args, ["--bogus"])
