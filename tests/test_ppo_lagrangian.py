"""ppo_lagrangian.py: each equation against an independent computation, then real runs."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

import model as M
import plumbing
import ppo_lagrangian as P
import dist_worker
from conftest import make_toy_checkpoints, run, torchrun

# ---- per-token reward and cost (safe_rlhf/algorithms/ppo_lag/trainer.py@82743cc:L258-287) ----


def test_kl_everywhere_score_only_at_last_real_token_zero_after():
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-0.3, -0.2, -0.1, -0.4]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -2.0], [-0.1, -0.2, -0.3, -0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])   # row 0 ends at t=2
    R, C, beta = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0]), 0.1
    rewards, costs = P.per_token_rewards_and_costs(R, C, old, ref, mask, beta, clip_range_score=50.0)
    # by hand: k = old - ref; row 0: k = [0.5, -1.0, 0.0, (1.0 masked)]
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 0.0 + 2.0, 0.0])
    assert costs[0].tolist() == pytest.approx([0.05, -0.1, 0.0 + 0.5, 0.0])
    # row 1: k = [-0.2, 0, 0.2, 0], ends at t=3
    assert rewards[1].tolist() == pytest.approx([0.02, 0.0, -0.02, -1.0])
    assert costs[1].tolist() == pytest.approx([-0.02, 0.0, 0.02, 3.0])


def test_score_clip_applies_to_the_summed_entry():
    old, ref, mask = torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2)
    rewards, costs = P.per_token_rewards_and_costs(torch.tensor([80.0]), torch.tensor([-70.0]), old, ref, mask,
                                                   0.1, clip_range_score=50.0)
    assert rewards.tolist() == [[0.0, 50.0]] and costs.tolist() == [[0.0, -50.0]]


# ---- GAE against a plain backward loop on ragged masks ---------------------------------------


def naive_gae(values, rewards, length, gamma, lam):
    """Per row, only the first `length` steps exist; the episode ends after the last one."""
    adv = [0.0] * length
    next_adv, next_value = 0.0, 0.0
    for t in reversed(range(length)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        adv[t], next_value = next_adv, values[t]
    return adv, [a + v for a, v in zip(adv, values[:length])]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_backward_loop_on_ragged_masks(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    T = 7
    values, rewards = torch.randn(4, T), torch.randn(4, T)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = P.gae(values, rewards, mask, gamma, lam)
    for b, n in enumerate(lengths):
        a, g = naive_gae(values[b].tolist(), rewards[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert ret[b, :n].tolist() == pytest.approx(g, rel=1e-5, abs=1e-6)
        assert torch.all(adv[b, n:] == 0)


def test_gae_terminal_step_does_not_bootstrap():
    values = torch.tensor([[0.0, 10.0, 99.0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, _ = P.gae(values, rewards, mask, 1.0, 1.0)
    assert adv[0, 1].item() == pytest.approx(1.0 - 10.0)         # r_end - V_end, no V_{end+1}


# ---- combined advantage and the clipped actor loss -------------------------------------------


def test_combined_advantage():
    ar, ac = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    assert P.combined_advantage(ar, ac, 0.0).tolist() == [[1.0, 2.0]]
    assert P.combined_advantage(ar, ac, 1.0).tolist() == [[(1 - 3) / 2, (2 + 1) / 2]]
    assert P.combined_advantage(ar, ac, 4.0)[0].tolist() == pytest.approx([(1 - 12) / 5, (2 + 4) / 5])


def test_actor_loss_clips_on_both_sides():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    old = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    loss, clip_frac = P.actor_loss(torch.log(ratio), old, adv, mask, eps)
    # by hand: min(r A, clip(r) A) = [min(1.5, 1.2), min(-0.5, -0.8), min(2.2, 2.2), min(0.5, 0.8)]
    expected = -(1.2 - 0.8 + 2.2 + 0.5) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 4)               # tokens 0 and 1 were clipped
    # the gradient through a clipped token is zero, through an unclipped one it is -A/n
    logp = torch.log(ratio).requires_grad_(True)
    P.actor_loss(logp, old, adv, mask, eps)[0].backward()
    assert logp.grad[0, 0].item() == 0 and logp.grad[0, 1].item() == 0
    assert logp.grad[0, 2].item() == pytest.approx(-2.0 * 1.1 / 4)


def test_actor_loss_is_per_sequence_mean_then_batch_mean():
    logp, old = torch.zeros(2, 3), torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, _ = P.actor_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 + 4.0) / 2)        # not -(3 + 4) / 4


# ---- clipped value loss ----------------------------------------------------------------------


def test_critic_loss_value_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[8.0, 1.0, -7.0]])
    returns = torch.tensor([[10.0, 0.0, 0.0]])
    mask = torch.ones(1, 3)
    loss = P.critic_loss(values, old, returns, mask, clip_range_value=5.0)
    # V_clip = [5, 1, -5]; max((V-G)^2, (Vc-G)^2) = [max(4, 25), max(1, 1), max(49, 25)]
    assert loss.item() == pytest.approx(0.5 * (25 + 1 + 49) / 3)


# ---- the dual update (eq. 12 / 31) -------------------------------------------------------------


def lambda_step(log_lambda0, episode_cost, threshold, lr, lambda_max=None):
    log_lambda = torch.nn.Parameter(torch.tensor(log_lambda0))
    opt = torch.optim.SGD([log_lambda], lr=lr)
    P.lagrange_multiplier_loss(log_lambda, episode_cost, threshold).backward()
    opt.step()
    if lambda_max is not None:
        with torch.no_grad():
            log_lambda.clamp_(max=math.log(lambda_max))
    return log_lambda.item()


def test_lambda_update_direction_closed_form_cap_and_sign():
    lam0 = 2.0
    up = lambda_step(math.log(lam0), episode_cost=0.5, threshold=0.0, lr=0.1)
    down = lambda_step(math.log(lam0), episode_cost=-0.5, threshold=0.0, lr=0.1)
    assert up > math.log(lam0) > down
    # closed form, paper eq. 31: log l + lr * l * (J_C - d)
    assert up == pytest.approx(math.log(lam0) + 0.1 * lam0 * 0.5, rel=1e-6)
    # the threshold is where the direction flips: E[C] <= threshold is the constraint
    assert lambda_step(0.0, episode_cost=-0.3, threshold=-0.4, lr=0.1) > 0.0
    assert lambda_step(0.0, episode_cost=-0.5, threshold=-0.4, lr=0.1) < 0.0
    # the cap
    assert lambda_step(math.log(4.9), episode_cost=10.0, threshold=0.0, lr=1.0, lambda_max=5.0) == pytest.approx(math.log(5.0))
    # lambda stays positive however far the cost is below the threshold
    log_l = 0.0
    for _ in range(200):
        log_l = lambda_step(log_l, episode_cost=-5.0, threshold=0.0, lr=0.5)
    assert math.exp(log_l) > 0.0


# ---- real runs: single process, 2 ranks, resume ------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy data plus random-init tiny SFT / reward / cost checkpoints (the stages' output format)."""
    root = tmp_path_factory.mktemp("ppo")
    make_toy_checkpoints(root)
    return root


def ppo_cmd(toy, out, *extra):
    return ["ppo_lagrangian.py", "--actor_model_name_or_path", toy / "sft", "--reward_model_name_or_path",
            toy / "reward", "--cost_model_name_or_path", toy / "cost", "--dataset", toy / "toy" / "prompts",
            "--limit", 16, "--per_device_prompt_batch_size", 4, "--per_device_train_batch_size", 4,
            "--epochs", 1, "--max_length", 40, "--sample_every", 0, "--output_dir", out, "--device", "cpu",
            "--threshold", -1.0, *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_single_process_run_saves_loadable_checkpoint(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    p = run([sys.executable, *ppo_cmd(toy, tmp_path / "run")])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert len(rows) == 4
    assert all(r["policy/first_pass_logratio_max"] < 1e-5 for r in rows)   # ratio == 1 on a fresh rollout
    # episode cost above the threshold (-1) -> lambda rises every step
    lambdas = [r["lagrangian/lambda"] for r in rows]
    assert all(b > a for a, b in zip([1.0] + lambdas, lambdas))
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    tok = M.load_tokenizer(tmp_path / "run", "right")
    for critic in ("reward_critic", "cost_critic"):
        M.load_score_model(str(tmp_path / "run" / critic), tok, "critic")


def test_fixed_lambda_baselines_keep_lambda(toy, tmp_path):
    p = run([sys.executable, *ppo_cmd(toy, tmp_path / "ppo", "--lambda_init", 0, "--lambda_lr", 0)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert {r["lagrangian/lambda"] for r in metrics(tmp_path / "ppo")} == {0.0}


def test_reward_shaping_run_critics_in_eval_mode_and_first_pass_check(toy, tmp_path, monkeypatch):
    """In-process, instrumented: the paper's shaping baseline keeps nu; the critics score rollouts in
    eval mode (after updates too); the first-pass ratio check is logged on each rollout's first
    micro-batch only (2 micro-batches x 2 PPO epochs per rollout here) and is 0 there."""
    calls = []   # (critic in train mode?, grad enabled?) for every critic forward
    prepare = M.prepare_model

    def instrumented(model, *args, trainable, **kwargs):
        model = prepare(model, *args, trainable=trainable, **kwargs)
        if trainable and isinstance(model, M.ScoreModel):   # the two critics
            model.register_forward_pre_hook(lambda m, _: calls.append((m.training, torch.is_grad_enabled())))
        return model
    monkeypatch.setattr(M, "prepare_model", instrumented)
    cmd = ppo_cmd(toy, tmp_path / "shaping", "--reward_shaping", "--lambda_init", 2.0, "--lambda_lr", 0,
                  "--per_device_prompt_batch_size", 8, "--update_iters", 2)
    P.main(plumbing.parse_args(P.Args, [str(c) for c in cmd[1:]]))
    rows = metrics(tmp_path / "shaping")
    assert len(rows) == 8 and {round(r["lagrangian/lambda"], 6) for r in rows} == {2.0}
    first = [r["step"] for r in rows if "policy/first_pass_logratio_max" in r]
    assert first == [1, 5] and all(r["policy/first_pass_logratio_max"] < 1e-5 for r in rows if r["step"] in first)
    scoring = [training for training, grad in calls if not grad]
    assert len(scoring) == 4 and not any(scoring)        # 2 rollouts x 2 critics, all in eval mode
    assert all(training for training, grad in calls if grad)
    with pytest.raises(plumbing.UserError, match="--reward_shaping keeps nu = --lambda_init fixed: give --lambda_lr 0"):
        P.main(plumbing.parse_args(P.Args, [str(c) for c in ppo_cmd(toy, tmp_path / "x", "--reward_shaping")[1:]]))



def test_a_row_without_actions_gets_nothing_and_leaves_the_others_alone():
    """A first sampled PAD leaves a row with an all-zero mask (M.sample masks PAD out): no index -1."""
    old, ref = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]]), torch.tensor([[-1.5, -1.0], [-0.5, -0.2]])
    mask, R, C = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([2.0, 7.0]), torch.tensor([0.5, 9.0])
    rewards, costs = P.per_token_rewards_and_costs(R, C, old, ref, mask, 0.1, clip_range_score=50.0)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1 + 2.0, 0.0, 0.0])   # row 0 by hand: k = [0.5, -1.0]
    assert costs.flatten().tolist() == pytest.approx([0.05, -0.1 + 0.5, 0.0, 0.0])

def test_reward_shaping_per_token_reward_by_hand():
    """-beta*k_t + [t = end](R - nu*C) in one stream (paper section 4.2.3), against a hand computation,
    and the Lagrangian form at fixed nu: the same trade-off with (1 + nu) times the KL weight."""
    old, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.1, -1.8, -0.8]])   # k = [0.1, -0.2, 0.3]
    mask, R, C, nu, beta = torch.ones(1, 3), torch.tensor([2.0]), torch.tensor([1.0]), 0.5, 0.1
    rewards, _ = P.per_token_rewards_and_costs(P.shaped_score(R, C, nu), C, old, ref, mask, beta, 50.0)
    assert rewards[0].tolist() == pytest.approx([-0.01, 0.02, -0.03 + (2.0 - 0.5 * 1.0)])
    r, c = P.per_token_rewards_and_costs(R, C, old, ref, mask, beta, 50.0)
    values = torch.zeros(1, 3)
    lagrangian = P.combined_advantage(P.gae(values, r, mask, 1.0, 0.95)[0], P.gae(values, c, mask, 1.0, 0.95)[0], nu)
    shaped_with_bigger_kl, _ = P.per_token_rewards_and_costs(P.shaped_score(R, C, nu), C, old, ref, mask, beta * (1 + nu), 50.0)
    assert (lagrangian * (1 + nu))[0].tolist() == pytest.approx(P.gae(values, shaped_with_bigger_kl, mask, 1.0, 0.95)[0][0].tolist())


def test_two_ranks_finish_with_identical_lambda(toy, tmp_path):
    p = torchrun(2, ppo_cmd(toy, tmp_path / "run2"), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads((tmp_path / "run2" / "train_state.json").read_text())
    assert len(state["log_lambda_per_rank"]) == 2
    assert state["log_lambda_per_rank"][0] == state["log_lambda_per_rank"][1]
    assert state["step"] == 2                                   # 16 prompts / (2 ranks x 4)
    tok = M.load_tokenizer(tmp_path / "run2", "right")
    assert plumbing.count_parameters(M.load_causal_lm(str(tmp_path / "run2"), tok)) > 0


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, tokenizer_dir):
    """dist_worker.init_uneven's tiny LLaMA and score models: no dimension divides by 4, so FSDP2's
    shards are uneven (the score heads' single row sits on rank 0 alone)."""
    root = tmp_path_factory.mktemp("uneven")
    dist_worker.init_uneven(root, str(tokenizer_dir))
    return root


def test_one_rl_step_of_each_policy_stage_on_four_ranks_equals_one_process(uneven, tmp_path):
    """One update given a fixed rollout, with each stage's own functions (dist_worker's rloo_step and
    ppo_step: for PPO-Lagrangian the dual step, the critics' values, GAE, the combined advantage, actor and
    both critics updated; for RLOO-Lagrangian whole groups of 4 per rank): 4 ranks x 8 sequences under
    FSDP2 with uneven shards reach the weights, losses and lambda of 1 process (here, in-process) with all 32."""
    tok = M.load_tokenizer(uneven / "init", "right")
    critic = M.load_score_model(str(uneven / "reward"), tok, "critic")
    assert all(p.shape[0] % 4 for p in critic.parameters())                  # every shard uneven
    dist_worker.policy_steps(tmp_path / "one", str(uneven / "init"))
    four = torchrun(4, ["tests/dist_worker.py", "policy_steps", tmp_path / "four", uneven / "init"], timeout=300)
    assert four.returncode == 0, four.stderr[-3000:]
    starts = {"actor": uneven / "init", "reward_critic": uneven / "reward", "cost_critic": uneven / "cost"}
    for mode, models in (("rloo_step", ("actor",)), ("ppo_step", ("actor", "reward_critic", "cost_critic"))):
        report = dist_worker.compare(tmp_path / "one" / mode, tmp_path / "four" / mode, starts)
        # SGD at lr 1 without a clip: each update is the gradient itself, so a change of scale anywhere
        # (RLOO's K/(K-1), a sum for a mean, a rank's rows missed) shows; the runs agree to fp32
        # summation order, 1e-5 relative (the reasoning: dist_worker.compare)
        for name in models:
            assert report[name]["largest_update"] > 0.1 and report[name]["relative_difference"] < 1e-5, (mode, report)
        for name in (*models, "lambda") if mode == "ppo_step" else models:
            loss = report[f"loss {name}"]
            assert abs(loss["one"]) > 1e-3 and loss["relative_difference"] < 1e-5, (mode, report)
    assert report["loss lambda"]["one"] != 0.5                                # the dual step moved lambda from its init


def test_resume_ends_where_an_uninterrupted_run_ends(toy, tmp_path):
    full = run([sys.executable, *ppo_cmd(toy, tmp_path / "full", "--limit", 24)])
    assert full.returncode == 0, full.stderr[-3000:]
    part = run([sys.executable, *ppo_cmd(toy, tmp_path / "split", "--limit", 24, "--stop_at_step", 3)])
    assert part.returncode == 0, part.stderr[-3000:]
    assert json.loads((tmp_path / "split" / "train_state.json").read_text())["step"] == 3
    rest = run([sys.executable, *ppo_cmd(toy, tmp_path / "split", "--limit", 24, "--resume")])
    assert rest.returncode == 0, rest.stderr[-3000:]
    for sub in ("", "reward_critic", "cost_critic"):
        a = load_file(tmp_path / "full" / sub / "model.safetensors")
        b = load_file(tmp_path / "split" / sub / "model.safetensors")
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}/{k} differs after resume"
    sa = json.loads((tmp_path / "full" / "train_state.json").read_text())
    sb = json.loads((tmp_path / "split" / "train_state.json").read_text())
    assert sa["log_lambda_per_rank"] == sb["log_lambda_per_rank"] and sa["episode_costs"] == sb["episode_costs"]


def test_missing_checkpoint_says_which_stage_to_run(toy, tmp_path):
    cmd = ppo_cmd(toy, tmp_path / "x")
    cmd[cmd.index("--cost_model_name_or_path") + 1] = tmp_path / "nope"
    p = run([sys.executable, *cmd])
    assert p.returncode == 2
    assert "run cost.py first" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "x").exists()


def test_ptx_loss_is_mean_nll_of_response_tokens():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.125, 1.0]]))
    labels = torch.tensor([[1, M.IGNORE_INDEX, 7, 8, M.IGNORE_INDEX]])   # targets: tokens 2 and 3
    assert P.ptx_loss(logprobs, labels).item() == pytest.approx(-(math.log(0.25) + math.log(0.125)) / 2)


def test_run_with_ptx(toy, tmp_path):
    p = run([sys.executable, *ppo_cmd(toy, tmp_path / "ptx", "--ptx_dataset", toy / "toy" / "sft", "--ptx_coeff", 1.0)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(metrics(tmp_path / "ptx")) == 4


def test_threshold_derived_from_the_cost_models_calibration(tmp_path):
    """d' = (1 - u) E[C | safe] + u E[C | unsafe], from cost.py's eval.json; no calibration: one line."""
    (tmp_path / "eval.json").write_text(json.dumps({"eval/safe_cost_mean": -4.0, "eval/unsafe_cost_mean": 4.0}))
    threshold, how = P.derived_threshold(str(tmp_path), 0.025)
    assert threshold == pytest.approx(0.975 * -4.0 + 0.025 * 4.0) and threshold == pytest.approx(-3.8)
    assert how.startswith("threshold -3.800 = (1 - 0.025) x -4.000 (mean C of safe answers) + 0.025 x +4.000")
    with pytest.raises(plumbing.UserError, match="no calibration to derive the threshold from .* give --threshold"):
        P.derived_threshold(str(tmp_path / "elsewhere"), 0.025)
