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
paper sums over tokens.

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
from plumbing import UserError
from ppo_lagrangian import (PolicyArgs, actor_step, check_args, checkpoint_due, combined_advantage, dual_step, generate,
                            load_data, load_models, log_step, make_lambda, open_logs, per_token_rewards_and_costs,
                            rollout_batches, save_run, score, shaped_score, start_run, step_record)

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
    an unbiased baseline (it does not depend on y_i) whose advantages sum to 0 within each group. With
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
    # ---- distributed set-up (model.py), checks ---------------------------------------------
    d = M.init_distributed(args.device)
    K = args.samples_per_prompt
    if K < 2:
        raise UserError(f"--samples_per_prompt {K}: the leave-one-out baseline needs at least 2 answers per prompt")
    if args.per_device_train_batch_size % K:
        raise UserError(f"--per_device_train_batch_size {args.per_device_train_batch_size}: must be a multiple of "
                        f"--samples_per_prompt {K}, so that every rl_step updates on whole groups")
    derivation = check_args(args, d, sequences_per_prompt=K)
    bf16 = d.device.type == "cuda"
    # Claim the folder before reading anything (as ppo_lagrangian.py; nothing written before the checks).
    lock, state = plumbing.open_run_folder(args, d.world_size, d.is_main, STAGE)  # noqa: F841 - held to the end

    # ---- tokenizer and data (validated before anything is written) -------------------------
    tokenizer, prompts, ptx_examples, data_summary, rollouts_per_epoch, total_rollouts = load_data(args, d)

    # ---- models: actor, reference, reward, cost (no critics) -------------------------------
    # Only rank 0 reads the checkpoints; the others receive the weights when prepare_model shards them.
    load = dict(dtype=torch.float32, trust_remote_code=args.trust_remote_code, meta=d.enabled and not d.is_main)
    actor, reference, reward_model, cost_model = load_models(args, d, tokenizer, **load)
    actor = M.prepare_model(actor, d, trainable=True, bf16=bf16, activation_checkpointing=args.gradient_checkpointing)
    reference = M.prepare_model(reference, d, trainable=False, bf16=bf16)
    reward_model = M.prepare_model(reward_model, d, trainable=False, bf16=bf16)
    cost_model = M.prepare_model(cost_model, d, trainable=False, bf16=bf16)
    M.print0(f"actor {plumbing.count_parameters(actor) * d.world_size / 1e6:.2f}M parameters (x4 models) | "
             f"{len(prompts)} unique prompts x {K} answers | {args.total_steps} rl_steps | world size {d.world_size}")

    # ---- optimisers: the actor's, plus SGD on log(lambda) ----------------------------------
    actor_opt = plumbing.make_optimizer(actor, args.actor_lr, args.actor_weight_decay,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    actor_sched = plumbing.make_scheduler(actor_opt, args.actor_lr_scheduler,
                                          int(args.actor_warmup_ratio * args.total_steps), args.total_steps)
    trained = {"actor": (actor, actor_opt, actor_sched)}
    log_lambda, lambda_opt, episode_costs = make_lambda(args, d)

    step, position = start_run(args, d, state, trained, log_lambda, episode_costs)
    logger, samples_log = open_logs(args, d, step, data_summary)
    M.print0(plumbing.recipe_line(args))
    M.print0(derivation or f"threshold {args.threshold:+.3f} (--threshold)")

    # ---- the loop -------------------------------------------------------------------------
    bar = plumbing.progress(total=args.total_steps, initial=step, enabled=d.is_main, desc="rloo-lag")
    meter = plumbing.Throughput(step, args.total_steps)
    for epoch, batch_prompts in rollout_batches(args, d, prompts, position, rollouts_per_epoch, total_rollouts):
        answered = [p for p in batch_prompts for _ in range(K)]   # the prompt of each of the B sequences
        timer = {"generation": 0.0, "scoring": 0.0, "training": 0.0}

        # ======== 1. rollout: K answers per prompt (no grad, eval mode) ==================
        t0 = time.perf_counter()
        actor.eval()
        sequences, attention_mask, S = generate(args, d, tokenizer, actor, batch_prompts, K)   # (B, L)
        timer["generation"] = time.perf_counter() - t0

        # ======== 2. score and record the old policy (no grad) ===========================
        t0 = time.perf_counter()
        # EOS, reward and cost, missing-EOS penalty, old and reference log-probs (ppo_lagrangian.score)
        rollout = score(args, d, tokenizer, sequences, attention_mask, S, actor, reference, reward_model, cost_model)
        reward, cost, old_logprobs, mask = rollout["reward"], rollout["cost"], rollout["old_logprobs"], rollout["mask"]
        # the episode-cost window holds the cost-model scores, as in ppo_lagrangian.py
        episode_costs.extend(cost.tolist())
        timer["scoring"] = time.perf_counter() - t0

        # ======== 3. sequence returns and each signal's leave-one-out advantage ==========
        score_ = shaped_score(reward, cost, args.lambda_init) if args.reward_shaping else reward  # (B,)
        rewards, costs = per_token_rewards_and_costs(score_, cost, old_logprobs, rollout["ref_logprobs"], mask,
                                                     args.kl_coeff, args.clip_range_score)  # (B, T) as ppo_lagrangian.py
        reward_returns, cost_returns = sequence_returns(rewards, costs)                   # (B,) each
        group = dict(samples_per_prompt=K, scale_by_std=args.scale_by_std, std_epsilon=args.std_epsilon)
        reward_advantages = leave_one_out_advantages(reward_returns, **group)            # (B,)
        cost_advantages = leave_one_out_advantages(cost_returns, **group)                # (B,)
        rollout.update(rewards=rewards, costs=costs,  # for the diagnostics: the advantages on every token
                       reward_advantages=reward_advantages[:, None] * mask, cost_advantages=cost_advantages[:, None] * mask)

        # ======== 4. actor updates: epochs x micro-batches (whole groups) of rl_steps ====
        t0 = time.perf_counter()
        actor.train()
        B, mb = sequences.shape[0], args.per_device_train_batch_size
        for update_iter in range(args.update_iters):
            for lo in range(0, B, mb):
                sl = slice(lo, lo + mb)
                # -- 4a. the dual step first (eq. 12): the same lambda on every rank ---------
                lagrange_multiplier, episode_cost = dual_step(args, d, log_lambda, lambda_opt, episode_costs, step)
                # -- 4b. actor (+ PTX): the sequence advantage on every token of its answer -----
                advantages = (reward_advantages[sl] if args.reward_shaping else  # shaping: one return
                              combined_advantage(reward_advantages[sl], cost_advantages[sl], lagrange_multiplier))
                advantages = advantages[:, None].expand_as(mask[sl])                                # (b, T)
                losses = actor_step(args, d, tokenizer, actor, actor_opt, actor_sched, sequences[sl],
                                    attention_mask[sl], S - 1, old_logprobs[sl], advantages, mask[sl],
                                    ptx_examples, step)
                step += 1
                bar.update(1)
                meter.add(tokens=M.all_reduce(attention_mask[sl].sum().float()).item(),
                          sequences=mb * d.world_size, rl_steps=1)

                # ======== 5. diagnostics: one record per rl_step, averaged over ranks ===========
                timer["training"] = time.perf_counter() - t0
                micro = {k: v[sl] for k, v in rollout.items()}
                record = step_record(step, epoch, micro, losses, update_iter == 0 and lo == 0, lagrange_multiplier,
                                     episode_cost, args.threshold)
                record.update({"lr/actor": actor_sched.get_last_lr()[0],
                               "memory/peak_gib": plumbing.peak_memory_gib(d.device),
                               **{f"time/{k}": v for k, v in timer.items()}})
                log_step(args, record, bar, meter, logger, samples_log, tokenizer, step, answered[lo:lo + 4],
                         sequences[sl], S, reward[sl], cost[sl])
        # stop only at a rollout boundary, so a resumed run continues with the next rollout
        stop = args.stop_at_step is not None and step >= args.stop_at_step
        if args.save and not stop and checkpoint_due(args, step):
            save_run(args, d, tokenizer, trained, log_lambda, episode_costs, {**position, "step": step}, STAGE)
        if stop:
            break
    bar.close()
    M.print0(f"trained: {meter.summary(step)}")

    # ---- saving, then tearing down ----------------------------------------------------------
    if args.save:
        save_run(args, d, tokenizer, trained, log_lambda, episode_costs, {**position, "step": step}, STAGE)
        M.print0(f"saved the actor to {args.output_dir}")
    M.teardown_distributed()


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.splitlines()[0])))
