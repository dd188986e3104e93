"""Issue 23: where the project silently differed from the official code (PKU-Alignment/safe-rlhf@82743cc),
now the same or stated: the baselines' beta under --recipe paper, lambda_max with --lambda_lr 0, the
advantage means as the official log computes them, a sampled UNK as a hole, and the run header's list
of every setting that differs from the official recipe."""

import math
from types import SimpleNamespace

import pytest
import torch

import model as M
import plumbing
import policy_run
import ppo_lagrangian as P
import reward
import rloo_lagrangian as R
import sft

MODES = {"PPO-Lagrangian": [], "plain PPO": ["--lambda_init", "0", "--lambda_lr", "0"],
         "reward shaping": ["--reward_shaping", "--lambda_init", "5", "--lambda_lr", "0"]}


# ---- item 2: --recipe paper's beta is the official script's for the mode -------------------------


@pytest.mark.parametrize("stage", [P, R])
@pytest.mark.parametrize("mode", MODES)
def test_paper_recipe_takes_the_official_beta_of_the_mode_unless_given(stage, mode):
    """scripts/ppo-lag.sh: 0.01; scripts/ppo.sh@82743cc:L159 and ppo-reward-shaping.sh@82743cc:L171: 0.02."""
    official = {"PPO-Lagrangian": 0.01, "plain PPO": 0.02, "reward shaping": 0.02}[mode]
    paper = plumbing.parse_args(stage.Args, ["--recipe", "paper", *MODES[mode]])
    assert paper.mode() == mode and paper.kl_coeff == official
    assert paper.kl_coeff_line().startswith(f"beta (--kl_coeff) {official:g}, as the official {mode} script's")
    assert "--kl_coeff" not in plumbing.recipe_line(paper)
    given = plumbing.parse_args(stage.Args, ["--recipe", "paper", *MODES[mode], "--kl_coeff", "0.01"])
    assert given.kl_coeff == 0.01 and (f"--kl_coeff 0.01 (paper {official:g})" in plumbing.recipe_line(given)) == (official != 0.01)
    toy = plumbing.parse_args(stage.Args, MODES[mode])   # the toy recipe is unchanged
    assert toy.kl_coeff == 0.1 and f"not the official {mode} script's {official:g}" in toy.kl_coeff_line()


def test_the_baselines_flags_are_the_official_recipe_of_their_mode():
    assert plumbing.recipe_line(plumbing.parse_args(P.Args, ["--recipe", "paper", *MODES["plain PPO"]])) \
        == "recipe paper | every official setting as the paper's"
    shaping = plumbing.recipe_line(plumbing.parse_args(P.Args, ["--recipe", "paper", *MODES["reward shaping"]]))
    assert shaping == "recipe paper | differs from the paper: --lambda_init 5 (paper 1)"   # nu: the script's default 1


# ---- item 3: lambda_max with --lambda_lr 0, but not for shaping's nu --------------------------------


def lambda_run(lambda_init, lambda_lr=0.0, lambda_max=5.0, reward_shaping=False, delay=0):
    log_lambda = torch.nn.Parameter(torch.tensor(math.log(lambda_init) if lambda_init > 0 else -math.inf))
    args = SimpleNamespace(lambda_lr=lambda_lr, lambda_max=lambda_max, threshold=0.0, reward_shaping=reward_shaping,
                           lambda_update_delay_steps=delay)
    return SimpleNamespace(args=args, d=M.Dist(0, 0, 1, torch.device("cpu")), log_lambda=log_lambda, step=0,
                           lambda_opt=torch.optim.SGD([log_lambda], lr=lambda_lr), episode_costs=[1.0, 2.0])


@pytest.mark.parametrize("case, expected", [
    (dict(lambda_init=10.0), [5.0, 5.0, 5.0]),                        # the Lagrangian, lambda fixed: capped (official)
    (dict(lambda_init=10.0, delay=2), [10.0, 10.0, 5.0]),             # as the official: after the update delay
    (dict(lambda_init=100.0, reward_shaping=True), [100.0] * 3),      # shaping's nu is no multiplier: no cap
    (dict(lambda_init=0.0), [0.0] * 3),                               # plain PPO
    (dict(lambda_init=2.0), [2.0] * 3)])                              # below the cap: untouched
def test_lambda_max_caps_a_fixed_lambda_but_not_shaping(case, expected):
    run = lambda_run(**case)
    got = []
    for step in range(3):
        run.step = step
        got.append(P.dual_step(run)[0])
    assert got == pytest.approx(expected, rel=1e-6)   # log(lambda) is a float32 parameter


# ---- item 5: the logged advantage means are the official train/*_advantage ---------------------------


def test_advantage_means_are_per_sequence_then_batch_means():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0]])
    micro = dict(reward=torch.zeros(2), cost=torch.zeros(2), has_eos=torch.ones(2, dtype=torch.bool),
                 old_logprobs=torch.zeros(2, 4), ref_logprobs=torch.zeros(2, 4), rewards=torch.zeros(2, 4),
                 costs=torch.zeros(2, 4), reward_advantages=advantages, cost_advantages=-advantages, mask=mask)
    losses = {"actor": torch.tensor(0.0), "clip_fraction": torch.tensor(0.0), "logratio_max": torch.tensor(0.0)}
    record = policy_run.step_record(1, 0, micro, losses, True, 1.0, 0.0, 0.0)
    assert record["policy/reward_advantage_mean"] == (1.0 + 5.0) / 2          # pooled over tokens: 9/5
    assert record["policy/cost_advantage_mean"] == -(1.0 + 5.0) / 2


# ---- item 4: a sampled UNK is a hole, as the official rollout mask; a sampled PAD ends the row -------


def test_a_sampled_unk_is_a_hole_and_what_is_scored_is_what_was_sampled(tokenizer_dir):
    tok = M.load_tokenizer(tokenizer_dir, "left")
    torch.manual_seed(0)
    policy = M.load_causal_lm("toy-tiny", tok)
    sampled_logits = []

    def force(module, args, output):   # no EOS, PAD or UNK but row 0's third token and row 1's sixth (last): UNK
        sampled_logits.append(output.logits[:, -1].detach().clone())
        output.logits[:, -1, [tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]] = -1e4
        step = len(sampled_logits)
        if step in (3, 6):
            output.logits[0 if step == 3 else 1, -1, tok.unk_token_id] = 1e4
        return output
    hook = policy.register_forward_hook(force)
    enc = tok(["how do i bake bread", "fix"], return_tensors="pt", padding=True)
    seqs, mask = M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, unk_token_id=tok.unk_token_id,
                          generator=torch.Generator().manual_seed(0))
    hook.remove()
    S = enc.input_ids.shape[1]
    assert seqs[0, S + 2] == tok.unk_token_id and seqs[1, S + 5] == tok.unk_token_id
    real = (seqs[:, S:] != tok.unk_token_id) & (seqs[:, S:] != tok.pad_token_id)
    assert mask[0, S:].tolist() == [1, 1, 0, 1, 1, 1]               # generation goes on after the hole
    assert torch.equal(mask[:, S:].bool(), real)                    # the official mask: id != PAD and != UNK
    # the score is read at the last real token: row 1's is the one before its UNK
    assert M.last_attended_index(mask).tolist() == [S + 5, S + 4]
    # every real token's log-prob in a full forward with the returned mask is the one it was sampled with
    # (the token after the hole too: positions count real tokens only, in sampling as in every forward)
    logprobs = M.policy_logprobs(policy, seqs, mask)[:, S - 1:]                            # (B, T)
    for b in range(2):
        for t in range(6):
            if mask[b, S + t]:
                expected = torch.log_softmax(sampled_logits[t][b].float(), -1)[seqs[b, S + t]]
                assert logprobs[b, t].item() == pytest.approx(expected.item(), abs=1e-5), (b, t)
    # no log-prob of the UNK in the loss, no reward at it: its column of the response mask is 0
    rewards, _ = P.per_token_rewards_and_costs(torch.ones(2), torch.zeros(2), torch.zeros(2, 6), torch.zeros(2, 6),
                                               mask[:, 1:][:, S - 1:].float(), 0.1, 50.0)
    assert rewards.tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0]]


def test_rollout_mask_rule_column_by_column():
    """UNK: a hole, the row goes on; PAD: the row ends (official: a hole too); EOS: kept, then the end;
    an UNK id that is the EOS or PAD id makes no holes."""
    token, finished = torch.tensor([0, 3, 2, 5]), torch.tensor([False, False, False, True])
    real, hole, ended = M.rollout_mask_step(token, finished, eos_token_id=2, pad_token_id=3, unk_token_id=0)
    assert real.tolist() == [False, False, True, False] and hole.tolist() == [True, False, False, False]
    assert ended.tolist() == [False, True, True, True]
    real, hole, _ = M.rollout_mask_step(token, finished, eos_token_id=2, pad_token_id=3, unk_token_id=2)
    assert not hole.any() and real.tolist() == [True, False, True, False]


# ---- item 7: the header lists every setting that differs from the official recipe -------------------


@pytest.mark.parametrize("stage", [sft, reward, P, R])
def test_recipe_line_lists_every_setting_that_differs(stage):
    """Not only Args.PAPER's fields: a field PAPER leaves out has its default as the official value."""
    line = plumbing.recipe_line(plumbing.parse_args(stage.Args, ["--recipe", "paper", "--adam_beta2", "0.999"]))
    assert line == "recipe paper | differs from the paper: --adam_beta2 0.999 (paper 0.95)"
    line = plumbing.recipe_line(plumbing.parse_args(stage.Args, ["--recipe", "paper", "--max_grad_norm", "0", "--limit", "9"]))
    assert "--limit 9 (paper None)" in line and "--max_grad_norm 0 (paper 1)" in line
    # run management and the paths to the user's own models are not settings
    own = ["--reward_model_name_or_path", "r", "--cost_model_name_or_path", "c"] if stage in (P, R) else []
    quiet = ["--recipe", "paper", "--output_dir", "o", "--log_every", "3", "--save_every", "7", "--stop_at_step", "9", *own]
    assert plumbing.recipe_line(plumbing.parse_args(stage.Args, quiet)) == "recipe paper | every official setting as the paper's"
