"""rloo_lagrangian.py: the group baseline against hand computations and a naive loop, then real runs
(one process, 2 ranks, resume) and its refusals."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

import model as M
import plumbing
import ppo_lagrangian as P
import rloo_lagrangian as R
from conftest import make_toy_checkpoints, run, torchrun

# ---- the leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740) -----------------------


def naive_leave_one_out(returns, K, scale_by_std=False, eps=1e-4):
    """A plain loop: each answer minus the mean of the other K - 1 answers of its prompt."""
    out = []
    for g in range(len(returns) // K):
        group = returns[g * K:(g + 1) * K]
        mean = sum(group) / K
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (K - 1))
        for i, x in enumerate(group):
            a = x - sum(group[j] for j in range(K) if j != i) / (K - 1)
            out.append(a / (std + eps) if scale_by_std else a)
    return out


def test_leave_one_out_by_hand_k2_and_k4():
    # K = 2: each answer's baseline is the other one
    assert R.leave_one_out_advantages(torch.tensor([1.0, 3.0, 5.0, -1.0]), 2).tolist() == [-2.0, 2.0, 6.0, -6.0]
    # K = 4: [1, 2, 3, 6]: baselines 11/3, 10/3, 9/3, 6/3; the advantages sum to 0
    a = R.leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4)
    assert a.tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0]) and a.sum().item() == pytest.approx(0.0, abs=1e-6)
    # with GRPO's scale: the unbiased std of [1, 2, 3, 6] is sqrt(14 / 3)
    s = R.leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4, scale_by_std=True)
    assert s.tolist() == pytest.approx([x / (math.sqrt(14 / 3) + 1e-4) for x in (-8 / 3, -4 / 3, 0.0, 4.0)])


@pytest.mark.parametrize("K,scale", [(2, False), (4, False), (4, True), (3, True)])
def test_leave_one_out_matches_a_naive_loop(K, scale):
    torch.manual_seed(K)
    returns = torch.randn(5 * K)
    got = R.leave_one_out_advantages(returns, K, scale_by_std=scale)
    assert got.tolist() == pytest.approx(naive_leave_one_out(returns.tolist(), K, scale), abs=1e-5)


def test_a_group_of_equal_returns_gets_zero_advantage():
    returns = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 5.0, 1.0, 5.0])
    for scale in (False, True):
        a = R.leave_one_out_advantages(returns, 4, scale_by_std=scale)
        assert a[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and a[4:].abs().min() > 0


def test_sequence_returns_are_R_minus_and_C_plus_the_summed_kl():
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])                      # k = [0.5, -1.0, 0.0, (masked)]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, costs = P.per_token_rewards_and_costs(torch.tensor([2.0]), torch.tensor([0.5]), old, ref, mask, 0.1, 50.0)
    g_r, g_c = R.sequence_returns(rewards, costs)
    assert g_r.item() == pytest.approx(2.0 - 0.1 * (0.5 - 1.0)) and g_c.item() == pytest.approx(0.5 + 0.1 * (0.5 - 1.0))


def test_normalise_then_combine_keeps_what_lambda_means():
    """Two answers to one prompt: y_1 less helpful (R 1 vs 3) and safer (C 0 vs 2). Without the std
    scale the two orders of combining and baselining agree exactly (the baseline is linear), so lambda
    weighs reward against cost in their own units, as in PPO-Lagrangian. With GRPO's std scale they do
    not: normalising each signal first makes lambda weigh the two standardised signals, whatever the
    cost model's units (a cost model ten times as steep changes nothing at lambda = 1: a tie), while
    normalising the combined return lets the steeper signal take over at the same lambda (arXiv 2602.05863)."""
    reward = torch.tensor([1.0, 3.0])

    def normalise_then_combine(cost, lam, scale):
        a_r = R.leave_one_out_advantages(reward, 2, scale_by_std=scale)
        a_c = R.leave_one_out_advantages(cost, 2, scale_by_std=scale)
        return P.combined_advantage(a_r, a_c, lam)

    def combine_then_normalise(cost, lam, scale):
        return R.leave_one_out_advantages((reward - lam * cost) / (1 + lam), 2, scale_by_std=scale)

    for cost in (torch.tensor([0.0, 2.0]), torch.tensor([0.0, 20.0])):
        for lam in (0.1, 1.0, 3.0):
            assert normalise_then_combine(cost, lam, False).tolist() == pytest.approx(
                combine_then_normalise(cost, lam, False).tolist())
    # std scale, lambda = 1: each signal's advantages are [-1, +1] / (std + eps) * std = about [-1.414, 1.414]
    for cost in (torch.tensor([0.0, 2.0]), torch.tensor([0.0, 20.0])):
        assert normalise_then_combine(cost, 1.0, True).tolist() == pytest.approx([0.0, 0.0], abs=1e-4)
    # combined first: R - C = [1, 1] ties, but R - 10 C = [1, -17] prefers the safer answer as hard as it can
    assert combine_then_normalise(torch.tensor([0.0, 2.0]), 1.0, True).tolist() == [0.0, 0.0]
    steep = combine_then_normalise(torch.tensor([0.0, 20.0]), 1.0, True)
    # (R - C) / 2 = [0.5, -8.5]: leave-one-out [9, -9], std 9 / sqrt(2)
    assert steep.tolist() == pytest.approx([9 / (9 / math.sqrt(2) + 1e-4), -9 / (9 / math.sqrt(2) + 1e-4)])


# ---- real runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("rloo")
    make_toy_checkpoints(root)
    return root


def rloo_cmd(toy, out, *extra):
    return ["rloo_lagrangian.py", "--actor_model_name_or_path", toy / "sft", "--reward_model_name_or_path",
            toy / "reward", "--cost_model_name_or_path", toy / "cost", "--dataset", toy / "toy" / "prompts",
            "--limit", 16, "--per_device_prompt_batch_size", 2, "--samples_per_prompt", 4,
            "--per_device_train_batch_size", 4, "--epochs", 1, "--max_length", 40, "--sample_every", 0,
            "--output_dir", out, "--device", "cpu", "--threshold", -1.0, *extra]


def in_process(cmd):
    R.main(plumbing.parse_args(R.Args, [str(c) for c in cmd[1:]]))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_saves_the_actor_alone_and_moves_lambda(toy, tmp_path):
    """16 prompts / 2 per rollout = 8 rollouts of 8 answers, 2 micro-batches each, 2 PPO epochs
    (--update_iters 2): 32 rl_steps.
    Lambda rises every step (J_C above the threshold) up to its cap, 5; the ratio is 1 on each rollout's first pass."""
    in_process(rloo_cmd(toy, tmp_path / "run", "--update_iters", 2))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 32 and [r["step"] for r in rows if "policy/first_pass_logratio_max" in r] == list(range(1, 33, 4))
    assert all(r["policy/first_pass_logratio_max"] < 1e-5 for r in rows if "policy/first_pass_logratio_max" in r)
    lambdas = [r["lagrangian/lambda"] for r in rows]
    assert all(b > a or b == pytest.approx(5.0) for a, b in zip([1.0] + lambdas, lambdas)) and max(lambdas) <= 5.0 + 1e-6
    assert not any(k.startswith(("loss/reward_critic", "loss/cost_critic")) for k in rows[0])
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["stage"] == "rloo_lagrangian" and state["step"] == 32
    assert not (tmp_path / "run" / "reward_critic").exists()
    M.load_causal_lm(str(tmp_path / "run"), M.load_tokenizer(tmp_path / "run", "right"))


def test_plain_rloo_shaping_and_the_std_scale(toy, tmp_path):
    """Plain RLOO keeps lambda 0; shaping keeps nu and its return is R - nu*C - beta*sum k (in the logs:
    reward_with_kl_penalty = reward - nu*cost - beta*kl on every rl_step); the std scale changes the update."""
    in_process(rloo_cmd(toy, tmp_path / "plain", "--lambda_init", 0, "--lambda_lr", 0))
    assert {r["lagrangian/lambda"] for r in metrics(tmp_path / "plain")} == {0.0}
    in_process(rloo_cmd(toy, tmp_path / "shaping", "--reward_shaping", "--lambda_init", 2.0, "--lambda_lr", 0))
    rows = metrics(tmp_path / "shaping")
    assert {round(r["lagrangian/lambda"], 6) for r in rows} == {2.0}
    for r in rows:
        assert r["objective/reward_with_kl_penalty"] == pytest.approx(
            r["objective/reward"] - 2.0 * r["objective/cost"] - 0.1 * r["objective/kl"], abs=1e-5)
    in_process(rloo_cmd(toy, tmp_path / "shaping_std", "--reward_shaping", "--lambda_init", 2.0, "--lambda_lr", 0,
                        "--scale_by_std"))
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in ("shaping", "shaping_std"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_ends_where_an_uninterrupted_run_ends(toy, tmp_path):
    in_process(rloo_cmd(toy, tmp_path / "full"))
    in_process(rloo_cmd(toy, tmp_path / "split", "--stop_at_step", 6))
    assert json.loads((tmp_path / "split" / "train_state.json").read_text())["step"] == 6
    in_process(rloo_cmd(toy, tmp_path / "split", "--resume"))
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "full" / "train_state.json").read_text())
    sb = json.loads((tmp_path / "split" / "train_state.json").read_text())
    assert sa["log_lambda_per_rank"] == sb["log_lambda_per_rank"] and sa["episode_costs"] == sb["episode_costs"]
    # an RLOO-Lagrangian checkpoint is not continued by ppo_lagrangian.py, nor the reverse
    with pytest.raises(plumbing.UserError, match="written by rloo_lagrangian.py, not ppo_lagrangian.py"):
        P.main(plumbing.parse_args(P.Args, [str(c) for c in ["--actor_model_name_or_path", toy / "sft",
               "--reward_model_name_or_path", toy / "reward", "--cost_model_name_or_path", toy / "cost", "--dataset",
               toy / "toy" / "prompts", "--limit", 16, "--epochs", 1, "--max_length", 40, "--device", "cpu",
               "--threshold", -1.0, "--output_dir", tmp_path / "full", "--resume"]]))
    P.main(plumbing.parse_args(P.Args, [str(c) for c in ["--actor_model_name_or_path", toy / "sft",
           "--reward_model_name_or_path", toy / "reward", "--cost_model_name_or_path", toy / "cost", "--dataset",
           toy / "toy" / "prompts", "--limit", 16, "--epochs", 1, "--max_length", 40, "--device", "cpu",
           "--per_device_prompt_batch_size", 16, "--threshold", -1.0, "--sample_every", 0, "--output_dir", tmp_path / "ppo"]]))
    with pytest.raises(plumbing.UserError, match="written by ppo_lagrangian.py, not rloo_lagrangian.py"):
        in_process(rloo_cmd(toy, tmp_path / "ppo", "--resume"))


# One update of this stage on 4 ranks against one process (uneven shards, whole groups per rank): in
# tests/test_ppo_lagrangian.py::test_one_rl_step_of_each_policy_stage_on_four_ranks_equals_one_process,
# which launches both stages' steps at once (the ranks' imports are most of the cost).


def test_two_ranks_finish_with_identical_lambda(toy, tmp_path):
    p = torchrun(2, rloo_cmd(toy, tmp_path / "run2"), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads((tmp_path / "run2" / "train_state.json").read_text())
    assert len(state["log_lambda_per_rank"]) == 2 and state["log_lambda_per_rank"][0] == state["log_lambda_per_rank"][1]
    assert state["step"] == 8                                   # 16 prompts / (2 ranks x 2) rollouts x 2 micro-batches


@pytest.mark.parametrize("extra,says", [
    (["--samples_per_prompt", 1], "--samples_per_prompt 1: the leave-one-out baseline needs at least 2 answers per prompt"),
    (["--per_device_train_batch_size", 6], "--per_device_train_batch_size 6: must be a multiple of --samples_per_prompt 4, "
                                           "so that every rl_step updates on whole groups"),
    (["--per_device_train_batch_size", 16, "--per_device_prompt_batch_size", 3],
     "--per_device_prompt_batch_size 3 x --samples_per_prompt 4 = 12 sequences must be a multiple of "
     "--per_device_train_batch_size 16"),
])
def test_bad_group_sizes_are_one_line_before_anything_is_written(toy, tmp_path, extra, says):
    p = run([sys.executable, *rloo_cmd(toy, tmp_path / "never", *extra)])
    assert p.returncode == 2 and p.stderr.strip() == f"error: {says}", p.stderr[-2000:]
    assert not (tmp_path / "never").exists()
