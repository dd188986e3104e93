"""rloo_lagrangian.py: Safe RLHF's policy stage without critics: the Lagrangian with group baselines.

The same constrained problem and dual as ppo_lagrangian.py (paper eq. 9-12):

    max_theta J_R(theta)   s.t.   J_C(theta) = E[C(y, x)] + d <= 0
    min_theta max_{lambda >= 0}  -J_R(theta) + lambda * J_C(theta)

but the two critics, and GAE with them, are replaced by a baseline made of other samples
(REINFORCE leave-one-out, RLOO: Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740, their RLOO estimator).
Each prompt x is answered K times (--samples_per_prompt), y_1 ... y_K, and each answer is ONE action
whose returns are the sums of ppo_lagrangian.py's per-token streams (so lambda means the same):

    G^R_i = R(y_i, x) - beta * sum_t k_t,     G^C_i = C(y_i, x) + beta * sum_t k_t,     k_t = log pi_old/pi_ref
    A^R_i = G^R_i - 1/(K-1) sum_{j != i} G^R_j          (likewise A^C_i; optionally / std_j(G_j), as GRPO:
                                                         Shao et al. 2024, arXiv 2402.03300, section 4.1.2)
    A_i   = (A^R_i - lambda * A^C_i) / (1 + lambda)      (ppo_lagrangian.combined_advantage)

Each signal gets its own baseline first and only then are they combined: with --scale_by_std,
normalising the combined return instead would make lambda's weight depend on how much each signal
varies within a group (test_normalise_then_combine_keeps_what_lambda_means; arXiv 2602.05863). A_i
multiplies every token of y_i in ppo_lagrangian.actor_loss (the same clipped surrogate on per-token
ratios), and lambda takes the same log-space step from the same episode-cost window
(ppo_lagrangian.dual_step) before every actor update. With one PPO epoch and one micro-batch per
rollout (the toy default) the ratio is exactly 1 and the surrogate's gradient is RLOO's REINFORCE
gradient (trl docs/source/rloo_trainer.md: "REINFORCE / A2C is a special case of PPO"); the token
mean per sequence makes it A_i times the MEAN token log-prob gradient of y_i, as GRPO, where RLOO's
paper sums over tokens: the 1/|y_i| weight depends on the answer, so this gradient is length-biased (Dr.
GRPO, Liu et al. 2025, arXiv 2503.20783; the baseline itself adds no bias; docs/rloo.md).

Four models instead of six: the actor, the reference, the reward and cost models (no critics, so
no critic updates and no value forwards in scoring). The memory this saves at 7B: docs/rloo.md.

Baselines come from this same file, as in ppo_lagrangian.py:
  * plain RLOO (RLHF):       --lambda_init 0 --lambda_lr 0   (the cost is still logged)
  * reward shaping R - nu*C: --reward_shaping --lambda_init nu --lambda_lr 0 (one return
                             R - nu C - beta sum_t k_t with its own leave-one-out baseline)

Left out, on purpose: everything ppo_lagrangian.py leaves out, and the GRPO-style KL term in the loss
(the paper's KL lives in the returns, as here); the batch-wide normalisation of advantages (TRL's
normalize_advantages, off by default there too); a sequence-level importance ratio (TRL's RLOO
multiplies the summed log-ratio; this file keeps ppo_lagrangian.py's per-token ratios).

Run (the toy world, after sft.py, reward.py and cost.py):
    python rloo_lagrangian.py
    torchrun --nproc_per_node 2 rloo_lagrangian.py
Real models on 8 GPUs, the official PPO-Lagrangian settings without the critics' (Args.PAPER; 4 prompts
x 4 samples = the official 16 sequences per rank per rollout):
    torchrun --nproc_per_node 8 rloo_lagrangian.py --recipe paper --reward_model_name_or_path runs/reward-7b \\
        --cost_model_name_or_path runs/cost-7b --output_dir runs/rloo-lag-7b

Shape letters: P prompts per rank per rollout, K samples per prompt, B = P x K sequences per rank,
b sequences per micro-batch, S padded prompt length, L = S + generated length, T = L - S response
positions (as in ppo_lagrangian.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

import model as M
import plumbing
import policy_run
from plumbing import UserError
# ppo_lagrangian.py's flags and Lagrangian math (the shared run machinery is policy_run.py's)
from ppo_lagrangian import (PolicyArgs, actor_objective, combined_advantage, derived_threshold, dual_step,
                            per_token_rewards_and_costs, shaped_score)

STAGE = "rloo_lagrangian"

# --------------------------------------------------------------------------------------------
# Args: ppo_lagrangian.py's, less the critics, plus the group
# --------------------------------------------------------------------------------------------


@dataclass
class Args(PolicyArgs):
    LIMITS: ClassVar[dict] = {**PolicyArgs.LIMITS, "samples_per_prompt": (1, None), "std_epsilon": (1e-12, None)}
    PAPER: ClassVar[dict] = {**PolicyArgs.PAPER, "per_device_prompt_batch_size": 4, "samples_per_prompt": 4}
    PAPER_SOURCE: ClassVar[str] = ("safe-rlhf scripts/ppo-lag.sh@82743cc:L148-198 less the critics; 4 prompts x 4 samples "
                                   "= its 16 sequences per rank per rollout; one epoch answers each prompt 4 times: 4x "
                                   "its answers and rl_steps (--epochs 0.25 matches them)")

    # toy defaults that differ from ppo_lagrangian.py's: the same 16 sequences per rollout and 40 samples
    # of each toy prompt over the run; half the learning rate
    per_device_prompt_batch_size: int = 4
    """prompts per rank per rollout, each answered --samples_per_prompt times (4 x 4 = 16 sequences)"""
    epochs: float = 10
    """passes over the prompt set, fractions allowed (paper 1: 4 answers to each prompt, 4x ppo_lagrangian.py's
    answers and rl_steps; toy: 10 x 4 = its 40 answers per prompt)"""
    actor_lr: float = 2.5e-4
    """actor learning rate (paper 1e-5; toy: half ppo_lagrangian.py's 5e-4, at which this stage over-optimises
    the cost model: docs/rloo.md)"""
    output_dir: str = "runs/rloo_lagrangian"
    """the actor (HF format), its optimiser state and the run's logs"""
    # the group baseline
    samples_per_prompt: int = 4
    """K: answers sampled per prompt; each one's baseline is the mean return of the other K - 1 (>= 2)"""
    scale_by_std: bool = False
    """divide each signal's leave-one-out advantage by the standard deviation of its group's returns (GRPO);
    off: plain RLOO, whose lambda weighs reward and cost in their own units, as in ppo_lagrangian.py"""
    std_epsilon: float = 1e-4
    """added to the group's standard deviation with --scale_by_std (TRL's 1e-4; > 0: a group of equal returns gets 0)"""


# --------------------------------------------------------------------------------------------
# The math, as small pure functions
# --------------------------------------------------------------------------------------------


def sequence_returns(rewards: torch.Tensor, costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The returns of whole answers: the sums (gamma = 1) of ppo_lagrangian.py's per-token streams
    (ppo_lagrangian.per_token_rewards_and_costs), so that lambda weighs the same two quantities:
        G^R = sum_t clip(-beta * k_t + [t = end] * R) = R - beta * sum_t k_t
        G^C = sum_t clip(+beta * k_t + [t = end] * C) = C + beta * sum_t k_t
    (the right-hand sides while the clip, +-50 by default, does not bind; trl/trainer/rloo_trainer.py@00313f2
    subtracts the same summed KL, `rewards - self.beta * kl`). An answer with no token at all (its first
    sample was PAD) returns 0 and 0, which also enter its siblings' baselines (rare; no bias, some variance).
    rewards, costs: (B, T), zero after the answer's end -> G^R, G^C: (B,)."""
    return rewards.sum(1), costs.sum(1)


def leave_one_out_advantages(returns: torch.Tensor, samples_per_prompt: int, scale_by_std: bool = False,
                             std_epsilon: float = 1e-4) -> torch.Tensor:
    """RLOO's baseline (Ahmadian et al. 2024, arXiv 2402.14740; trl/trainer/rloo_trainer.py@00313f2): with the K
    answers of a prompt next to each other in `returns`,
        A_i = G_i - 1/(K-1) * sum_{j != i} G_j  =  K/(K-1) * (G_i - mean_j G_j)
    a baseline that adds no bias (it does not depend on y_i; the token mean in the loss adds a length
    bias, docs/rloo.md) and whose advantages sum to 0 within each group. With
    scale_by_std, A_i / (std_j G_j + eps), the unbiased std of the K returns, as GRPO scales (its A is
    G_i - mean, so this is (K/(K-1)) times GRPO's; the std depends on y_i too, so the scaled gradient is
    no longer exactly unbiased). A group whose K returns are equal gets A = 0.
    returns: (P*K,) -> (P*K,)"""
    K = samples_per_prompt
    groups = returns.view(-1, K)                                                     # (P, K)
    baseline = (groups.sum(1, keepdim=True) - groups) / (K - 1)                      # (P, K) mean of the others
    advantages = groups - baseline                                                   # (P, K)
    if scale_by_std:
        advantages = advantages / (groups.std(1, keepdim=True) + std_epsilon)        # (P, K)
    return advantages.reshape(-1)                                                    # (P*K,)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(args: Args) -> None:
    # ---- distributed set-up (model.py), checks, the run folder, tokenizer and data ----------
    d = M.init_distributed(args.device)
    K = args.samples_per_prompt
    if K < 2:
        raise UserError(f"--samples_per_prompt {K}: the leave-one-out baseline needs at least 2 answers per prompt")
    if args.per_device_train_batch_size % K:
        raise UserError(f"--per_device_train_batch_size {args.per_device_train_batch_size}: must be a multiple of "
                        f"--samples_per_prompt {K}, so that every rl_step updates on whole groups")
    policy_run.check_args(args, d, sequences_per_prompt=K)
    derivation = None
    if args.threshold is None:   # derived as ppo_lagrangian.py does, before the run folder compares the arguments
        args.threshold, derivation = derived_threshold(args.cost_model_name_or_path, args.target_unsafe_share)
    # Claim the folder before reading anything (as ppo_lagrangian.py; nothing written before the checks).
    run = policy_run.open_run(args, d, STAGE, derivation)

    # ---- models: actor, reference, reward, cost (no critics) -------------------------------
    # Only rank 0 reads the checkpoints; the others receive the weights when prepare_model shards them.
    policy_run.load_models(run)
    policy_run.prepare_models(run)   # the actor trained, the other three frozen
    actor = run.actor
    M.print0(f"actor {plumbing.count_parameters(actor) * d.world_size / 1e6:.2f}M parameters (x4 models) | "
             f"{len(run.prompts)} unique prompts x {K} answers | {args.total_steps} rl_steps | world size {d.world_size}")

    # ---- optimisers: the actor's, plus SGD on log(lambda) ----------------------------------
    policy_run.add_optimizer(run, "actor", actor, args.actor_lr, args.actor_weight_decay, args.actor_lr_scheduler)
    policy_run.start_run(run, desc="rloo-lag")   # log(lambda), the resume (--resume), the logs, the progress bar

    # ---- the loop -------------------------------------------------------------------------
    for epoch, batch_prompts in policy_run.rollout_batches(run):
        # ======== 1. rollout: K answers per prompt (no grad, eval mode) ==================
        t0 = time.perf_counter()
        actor.eval()
        rollout = policy_run.generate_responses(run, epoch, batch_prompts, K)   # a prompt's K answers side by side
        sequences = rollout.sequences                                            # (B, L)
        rollout.timer["generation"] = time.perf_counter() - t0

        # ======== 2. score and record the old policy (no grad) ===========================
        t0 = time.perf_counter()
        # EOS, reward and cost, missing-EOS penalty, old and reference log-probs (as ppo_lagrangian.py)
        scores = policy_run.score_responses(run, rollout)
        reward, cost, old_logprobs, mask = scores["reward"], scores["cost"], scores["old_logprobs"], scores["mask"]
        # the episode-cost window holds the cost-model scores, as in ppo_lagrangian.py
        run.episode_costs.extend(cost.tolist())
        rollout.timer["scoring"] = time.perf_counter() - t0

        # ======== 3. sequence returns and each signal's leave-one-out advantage ==========
        score_ = shaped_score(reward, cost, args.lambda_init) if args.reward_shaping else reward  # (B,)
        rewards, costs = per_token_rewards_and_costs(score_, cost, old_logprobs, scores["ref_logprobs"], mask,
                                                     args.kl_coeff, args.clip_range_score)  # (B, T) as ppo_lagrangian.py
        reward_returns, cost_returns = sequence_returns(rewards, costs)                   # (B,) each
        group = dict(samples_per_prompt=K, scale_by_std=args.scale_by_std, std_epsilon=args.std_epsilon)
        reward_advantages = leave_one_out_advantages(reward_returns, **group)            # (B,)
        cost_advantages = leave_one_out_advantages(cost_returns, **group)                # (B,)
        scores.update(rewards=rewards, costs=costs,  # for the diagnostics: the advantages on every token
                      reward_advantages=reward_advantages[:, None] * mask, cost_advantages=cost_advantages[:, None] * mask)

        # ======== 4. actor updates: epochs x micro-batches (whole groups) of rl_steps ====
        t0 = time.perf_counter()
        actor.train()
        B, mb = sequences.shape[0], args.per_device_train_batch_size
        for update_iter in range(args.update_iters):
            for lo in range(0, B, mb):
                sl = slice(lo, lo + mb)
                # -- 4a. the dual step first (eq. 12): the same lambda on every rank ---------
                lagrange_multiplier, episode_cost = dual_step(run)
                # -- 4b. actor (+ PTX): the sequence advantage on every token of its answer -----
                advantages = (reward_advantages[sl] if args.reward_shaping else  # shaping: one return
                              combined_advantage(reward_advantages[sl], cost_advantages[sl], lagrange_multiplier))
                advantages = advantages[:, None].expand_as(mask[sl])                                # (b, T)
                logprobs, ptx = policy_run.actor_forward(run, rollout, sl)   # (b, T); PTX's log-probs, labels
                loss, losses = actor_objective(logprobs, old_logprobs[sl], advantages, mask[sl], args.clip_range_ratio,
                                               ptx, args.ptx_coeff)
                plumbing.check_finite(losses["actor"], "actor loss", run.step)
                policy_run.optimizer_step(run, "actor", loss)
                run.step += 1

                # ======== 5. diagnostics: one record per rl_step, averaged over ranks ===========
                rollout.timer["training"] = time.perf_counter() - t0
                policy_run.log_step(run, rollout, sl, losses, update_iter == 0 and lo == 0, lagrange_multiplier,
                                    episode_cost)
        if policy_run.end_of_rollout(run):   # a checkpoint when due; --stop_at_step stops at a rollout's end
            break

    # ---- saving ------------------------------------------------------------------------------
    policy_run.finish_run(run)


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.splitlines()[0])))
    M.teardown_distributed()
