"""dpo.py: each method's loss against a hand computation or a naive loop, SafeDPO's re-ordering on the
four safety types, MoCAN's lambda* against a brute-force grid solve of its dual, SACPO's tilt identity,
bad input (one line, exit 2, nothing written), a tiny run resumed equal to an uninterrupted one, and
one update on 2 ranks (FSDP2 over gloo) equal to one process.
"""

import json
import math
import sys

import pytest
import torch

import data_rules
import dpo
from conftest import ROOT, make_toy_checkpoints, run
from plumbing import UserError
from test_supervised import assert_same_weights, ok, one_line_error, write_jsonl

sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


# ---- the losses ---------------------------------------------------------------------------------


def test_dpo_loss_hand_value():
    # one pair: policy log-probs -3, -5; reference -4, -4; beta 0.5 -> margin 0.5*(1) - 0.5*(-1) = 1
    loss = dpo.dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), 0.5)
    assert loss.item() == pytest.approx(-math.log(sigmoid(1.0)), abs=1e-6)


def test_dpo_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.randn(7, generator=g) * 3 for _ in range(4))
    beta = 0.3
    naive = sum(-math.log(sigmoid(beta * (pw[i] - rw[i]).item() - beta * (pl[i] - rl[i]).item())) for i in range(7)) / 7
    assert dpo.dpo_loss(pw, pl, rw, rl, beta).item() == pytest.approx(naive, abs=1e-5)


def test_response_logprob_sums_keep_only_response_tokens(tmp_path):
    from conftest import make_word_tokenizer
    import model as M
    tok = M.load_tokenizer(make_word_tokenizer(tmp_path / "tok"), "right")
    prompt = M.format_prompt("how do i bake bread")
    first, second = "knead the dough", "sorry cannot help"
    ids = tok([prompt + first + tok.eos_token, prompt + second + " with that" + tok.eos_token])["input_ids"]
    pair = {"first": ids[0], "second": ids[1], "text": ("how do i bake bread", first, second), "labels": []}
    dpo.add_prompt_lengths([pair], tok)
    n_prompt = len(tok(prompt)["input_ids"])
    assert pair["prompt_length"] == n_prompt
    batch = dpo.collate([pair], tok.pad_token_id)
    # entry t scores token t+1: the response (and EOS) tokens are ids[n_prompt:], entries n_prompt-1 ...
    assert batch["response_mask"][0].tolist() == [0.0] * (n_prompt - 1) + [1.0] * (len(ids[0]) - n_prompt) + \
        [0.0] * (len(ids[1]) - len(ids[0]))
    assert batch["response_mask"][1].sum().item() == len(ids[1]) - n_prompt
    logprobs = torch.arange(batch["response_mask"].numel(), dtype=torch.float32).reshape(batch["response_mask"].shape)
    sums = dpo.response_logprob_sums(logprobs, batch["response_mask"])
    assert sums[0].item() == sum(logprobs[0, t].item() for t in range(n_prompt - 1, len(ids[0]) - 1))


# ---- SafeDPO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("better, safe0, safe1, expected", [
    (0, True, True, (0, 1, 0.0, 0.0)),     # both safe: kept, no margin
    (1, True, True, (1, 0, 0.0, 0.0)),
    (0, True, False, (0, 1, 0.0, 1.0)),    # the winner safe, the loser unsafe: kept, margin
    (1, False, True, (1, 0, 0.0, 1.0)),
    (0, False, True, (1, 0, 0.0, 1.0)),    # the winner unsafe, the loser safe: swapped, margin
    (1, True, False, (0, 1, 0.0, 1.0)),
    (0, False, False, None),               # both unsafe: discarded
    (1, False, False, None),
])
def test_safedpo_order_on_the_four_safety_types(better, safe0, safe1, expected):
    assert dpo.safedpo_order(better, safe0, safe1) == expected
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": better,
           "is_response_0_safe": safe0, "is_response_1_safe": str(safe1).lower()}   # "true"/"false" read too
    if expected is None:
        with pytest.raises(data_rules.LeftOut, match="two unsafe responses"):
            dpo.safedpo_pair(row, "row 0")
        return
    chosen, rejected, labels = dpo.safedpo_pair(row, "row 0")
    assert (chosen, rejected) == ("ab"[expected[0]], "ab"[expected[1]]) and labels == list(expected[2:])


def test_pairs_safedpo_leaves_out_are_counted_never_refused_or_warned_about():
    summary = data_rules.DataSummary("--dataset", "d", "train")
    summary.read = 10
    for row in range(3):
        summary.leave_out("pairs of two unsafe responses (SafeDPO's transformation)", row)
    assert summary.used == 7 and summary.check(strict=True) == []          # 30% left out: no warning, no --strict refusal
    assert "left out by the method: 3 pairs of two unsafe responses" in summary.lines()[0]
    for row in range(3, 10):
        summary.leave_out("pairs of two unsafe responses (SafeDPO's transformation)", row)
    with pytest.raises(UserError, match="no usable row .* row 0: pairs of two unsafe responses"):
        summary.check(strict=False)


def test_safedpo_loss_hand_value_and_margin_free_case():
    pw, pl, rw, rl = torch.tensor([-3.0, -2.0]), torch.tensor([-5.0, -2.5]), torch.tensor([-4.0, -2.0]), torch.tensor([-4.0, -2.0])
    cu, ru = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])   # pair 0: safe vs unsafe (margin); pair 1: both safe
    beta, delta = 0.5, 2.0
    m0 = 0.5 * 1 - 0.5 * (-1) - delta          # 1 - 2
    m1 = 0.5 * 0 - 0.5 * (-0.5)                # 0.25, no margin
    expected = (-math.log(sigmoid(m0)) - math.log(sigmoid(m1))) / 2
    assert dpo.safedpo_loss(pw, pl, rw, rl, cu, ru, beta, delta).item() == pytest.approx(expected, abs=1e-6)
    assert dpo.safedpo_loss(pw, pl, rw, rl, cu, ru, beta, 0.0).item() == pytest.approx(dpo.dpo_loss(pw, pl, rw, rl, beta).item())


# ---- MoCAN ----------------------------------------------------------------------------------------


def test_mocan_dual_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    r, c = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    beta, d, lam = 0.7, -0.2, 1.3
    naive = sum(beta * math.log(sum(math.exp((r[i, k] - lam * c[i, k]).item() / beta) for k in range(4)) / 4)
                for i in range(3)) / 3 + lam * d
    assert dpo.mocan_dual(torch.tensor(lam, dtype=torch.float64), r, c, beta, d).item() == pytest.approx(naive, abs=1e-10)


@pytest.mark.parametrize("seed, threshold", [(2, -0.6), (3, -0.5), (4, -0.8)])   # interior optima (0 < lambda* < 10)
def test_mocan_lambda_matches_a_brute_force_grid_solve(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(4, 6, generator=g, dtype=torch.float64)
    c = torch.randn(4, 6, generator=g, dtype=torch.float64) + 0.5 * r   # helpful answers cost more, as in the world
    beta, lam_max = 0.5, 10.0
    lam = dpo.mocan_solve_dual(r, c, beta, threshold, lam_max)
    grid = torch.linspace(0, lam_max, 100001, dtype=torch.float64)     # step 1e-4
    values = dpo.mocan_dual(grid, r, c, beta, threshold)
    lam_grid = grid[values.argmin()].item()
    assert lam == pytest.approx(lam_grid, abs=2e-4)
    assert dpo.mocan_dual(torch.tensor(lam, dtype=torch.float64), r, c, beta, threshold).item() <= values.min().item() + 1e-9
    assert 0 < lam < lam_max   # the boundary cases are the next test's
    w = torch.softmax((r - lam * c) / beta, dim=-1)
    assert (w * c).sum(-1).mean().item() == pytest.approx(threshold, abs=1e-6)   # the constraint holds with equality


def test_mocan_lambda_is_zero_when_the_reference_tilt_is_already_safe():
    r, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, -2.0]])   # every answer costs less than d
    assert dpo.mocan_solve_dual(r, c, 0.1, threshold=0.0, lambda_max=10.0) == 0.0
    assert dpo.mocan_solve_dual(r, c + 10, 0.1, threshold=0.0, lambda_max=10.0) == 10.0   # infeasible: the bound


def test_pseudo_preference_and_soft_dpo_loss():
    p = dpo.pseudo_preference(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([-1.0]), 0.5)
    assert p.item() == pytest.approx(sigmoid((2 - 0.5) - (0.5 + 0.5)))
    pw, pl, rw, rl = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    soft = dpo.soft_dpo_loss(pw, pl, rw, rl, torch.tensor([0.25]), 0.5).item()
    assert soft == pytest.approx(-0.25 * math.log(sigmoid(1.0)) - 0.75 * math.log(sigmoid(-1.0)), abs=1e-6)
    assert dpo.soft_dpo_loss(pw, pl, rw, rl, torch.ones(1), 0.5).item() == pytest.approx(dpo.dpo_loss(pw, pl, rw, rl, 0.5).item())
    assert dpo.soft_dpo_loss(pw, pl, rw, rl, torch.zeros(1), 0.5).item() == pytest.approx(dpo.dpo_loss(pl, pw, rl, rw, 0.5).item())


# ---- SACPO --------------------------------------------------------------------------------------


def test_sacpo_step_two_recovers_the_lagrangian_optimum_on_a_finite_space():
    """pi*_{r + lambda g} (the beta-KL optimum from pi_ref) equals the (beta/lambda)-KL optimum of g
    alone from pi*_r: the identity behind the safety step's coefficient."""
    g = torch.Generator().manual_seed(5)
    log_ref, r, u = torch.randn(6, generator=g).log_softmax(0), torch.randn(6, generator=g), torch.randn(6, generator=g)
    beta, lam = 0.4, 0.3
    direct = (log_ref + (r + lam * u) / beta).log_softmax(0)
    step1 = (log_ref + r / beta).log_softmax(0)
    step2 = (step1 + u / dpo.sacpo_beta(beta, lam)).log_softmax(0)
    torch.testing.assert_close(direct, step2)


# ---- end to end: bad input, a tiny run and its resume ------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return root, make_toy_checkpoints(root)


FAST = ["--limit", "16", "--eval_limit", "8", "--epochs", "1", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--max_length", "96", "--lr", "1e-3", "--log_every", "1"]


def dpo_cmd(root, data, out, *extra):
    return [sys.executable, ROOT / "dpo.py", "--dataset", data / "preference", "--model_name_or_path", root / "sft",
            "--output_dir", out, *FAST, *extra]


def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path):
    root, data = world
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--method ppo: choose one of dpo, safedpo, mocan, sacpo"):
        dpo.main(dpo.Args(method="ppo", dataset=str(data / "preference"), model_name_or_path=str(root / "sft"),
                          output_dir=str(out)))
    with pytest.raises(UserError, match="--method mocan needs --cost_model_name_or_path"):
        dpo.main(dpo.Args(method="mocan", reward_model_name_or_path=str(root / "reward"),
                          dataset=str(data / "preference"), model_name_or_path=str(root / "sft"), output_dir=str(out)))
    with pytest.raises(UserError, match="--cost_model_name_or_path .* is a reward model"):
        dpo.main(dpo.Args(method="mocan", reward_model_name_or_path=str(root / "reward"),
                          cost_model_name_or_path=str(root / "reward"), dataset=str(data / "preference"),
                          model_name_or_path=str(root / "sft"), output_dir=str(out)))
    rows = [json.loads(line) for line in (data / "preference" / "train.jsonl").read_text().splitlines()[:6]]
    rows[3] = {k: v for k, v in rows[3].items() if k != "is_response_1_safe"}
    p = run([sys.executable, ROOT / "dpo.py", "--method", "safedpo", "--recipe", "toy", "--dataset",
             write_jsonl(tmp_path / "nolabel.jsonl", rows), "--eval_split", "", "--model_name_or_path", root / "sft",
             "--output_dir", out])
    one_line_error(p, "row 3 has no field 'is_response_1_safe'")
    rows[3]["is_response_1_safe"] = "maybe"   # a label that is there but unreadable: in-process, same code path
    with pytest.raises(UserError, match="is_response_1_safe must be true/false or 1/0, got 'maybe'"):
        dpo.main(dpo.Args(method="safedpo", recipe="toy", dataset=str(write_jsonl(tmp_path / "bad.jsonl", rows)),
                          eval_split="", model_name_or_path=str(root / "sft"), output_dir=str(out)))
    assert not out.exists()


def test_safedpo_smoke_and_resume_equals_uninterrupted(world, tmp_path):
    root, data = world
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run(dpo_cmd(root, data, a, "--method", "safedpo")))
    result = json.loads((a / "eval.json").read_text())
    assert {"eval/loss", "eval/accuracy"} <= set(result) and math.isfinite(result["eval/loss"])
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((a / "data_summary.json").read_text())["train"]
    assert summary["rows_used"] == 16 - summary["left_out"]["pairs of two unsafe responses (SafeDPO's transformation)"]["count"]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, summary["rows_used"] // 4 + 1))
    # step 1 starts at policy == reference: every implicit reward is 0, the loss log 2 + the margin's share
    ok(run(dpo_cmd(root, data, b, "--method", "safedpo", "--stop_at_step", "2")))
    assert json.loads((b / "train_state.json").read_text())["trainer"]["step"] == 2
    ok(run(dpo_cmd(root, data, b, "--method", "safedpo", "--resume")))
    assert_same_weights(a, b)


def test_mocan_smoke_solves_the_dual_first_and_resumes_exactly(world, tmp_path):
    """lambda* from K samples of the reference before the first step, logged with its dual values; a run
    stopped after step 1 and resumed draws the same samples (per-rank generator), hence the same lambda*,
    labels and weights (on the same number of ranks)."""
    root, data = world
    a, b = tmp_path / "a", tmp_path / "b"
    mocan = ["--method", "mocan", "--reward_model_name_or_path", root / "reward", "--cost_model_name_or_path",
             root / "cost", "--threshold", "0.0", "--mocan_prompts", "4", "--mocan_samples", "2", "--max_steps", "2"]
    p = ok(run(dpo_cmd(root, data, a, *mocan)))
    assert "lambda* =" in p.stdout
    first = json.loads((a / "metrics.jsonl").read_text().splitlines()[0])
    assert first["mocan/prompts"] == 4 and first["mocan/samples"] == 2 and first["mocan/lambda"] >= 0
    assert first["mocan/dual_at_lambda"] <= first["mocan/dual_at_0"] + 1e-9
    ok(run(dpo_cmd(root, data, b, *mocan, "--stop_at_step", "1")))
    ok(run(dpo_cmd(root, data, b, *mocan, "--resume")))
    assert_same_weights(a, b)


@pytest.mark.parametrize("method", ["dpo", "sacpo"])
def test_first_step_starts_at_the_reference(method, world, tmp_path):
    """At step 1 the policy is the reference: every implicit reward is 0, so DPO's loss is log 2 exactly
    (a check of the masks and of the reference pass). sacpo's step 2 starts from the SFT model here, as
    a stand-in for step 1's DPO policy (its reference defaults to the same checkpoint)."""
    root, data = world
    out = tmp_path / method
    ok(run(dpo_cmd(root, data, out, "--method", method, "--max_steps", "1", "--eval_split", "")))
    step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line][0]
    assert step["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step["train/margin"] == pytest.approx(0.0, abs=1e-5) and step["train/accuracy"] == 0.0
    assert json.loads((out / "args.json").read_text())["method"] == method


def test_one_update_on_two_ranks_equals_one_process(world, tmp_path):
    """SafeDPO, one optimiser step of the same 8 pairs: 2 ranks x 4 pairs (FSDP2 over gloo) against one
    process x 8 pairs. fp32 on CPU: equal up to the reduction order."""
    from conftest import torchrun
    root, data = world
    one, two = tmp_path / "one", tmp_path / "two"
    # --adam_epsilon 1: AdamW's first step lr * g / (|g| + eps) is then about lr * g, linear in the
    # gradient, so the weights after it compare like the gradients (with the default 1e-8 the step is
    # lr * sign(g), and an entry whose gradient is ~0 may move +lr in one run and -lr in the other)
    common = ["--method", "safedpo", "--max_steps", "1", "--eval_split", "", "--adam_epsilon", "1", "--lr", "1e-2",
              "--per_device_train_batch_size"]
    ok(run(dpo_cmd(root, data, one, *common, "8")))
    ok(torchrun(2, dpo_cmd(root, data, two, *common, "4")[1:]))
    a, b = ([json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines() if "train/loss" in line][0]
            for f in (one, two))
    # the loss and the global gradient norm: the gradients of the two runs agree
    assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
    assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-5)
    from test_supervised import weights
    wa, wb = weights(one), weights(two)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
