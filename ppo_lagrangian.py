"""ppo_lagrangian.py: Safe RLHF's policy stage, PPO with a Lagrange multiplier (paper section 3.3).

The constrained problem (paper eq. 9-10) and its Lagrangian dual (eq. 12):

    max_theta J_R(theta)   s.t.   J_C(theta) = E[C(y, x)] + d <= 0
    min_theta max_{lambda >= 0}  -J_R(theta) + lambda * J_C(theta)

solved by alternating (a) a PPO step on the policy with the combined advantage
(A_R - lambda * A_C) / (1 + lambda), GAE run separately on a reward stream and a cost stream, each
with its own critic, and (b) a gradient-ascent step on lambda, parameterised as log(lambda) so it
stays >= 0 (paper eq. 31): log lambda <- log lambda + lr * lambda * J_C, with J_C estimated as the
mean episode cost minus the threshold (J_C always includes d; the log's `lagrangian/episode_cost` is
E[C] alone and `lagrangian/constraint_violation` is J_C).

Sign convention of the threshold (stated once): the constraint enforced is E[C] <= threshold,
i.e. threshold = -d in the paper's notation. With the official threshold 0 (safe-rlhf
scripts/ppo-lag.sh@82743cc:L148-198), "on average the cost model classifies the responses as safe"
(a cost model trained with eq. 6 puts C > 0 on unsafe responses). The toy world's -3.8 and how to
choose a threshold for a real cost model: see the `threshold` field below.

Baselines come from this same file, no second algorithm:
  * plain PPO (RLHF):        --lambda_init 0 --lambda_lr 0   (the cost stream is still logged)
  * reward shaping R - nu*C: --reward_shaping --lambda_init nu --lambda_lr 0, as the paper (section
    4.2.3) and the official trainer define it (safe_rlhf/algorithms/ppo_reward_shaping/trainer.py@82743cc:L39-303):
    one stream r_t = clip(-beta*k_t + [t = end](R - nu C)), its critic, plain PPO (`shaped_score`).
    Its relation to this file's Lagrangian form: lambda fixed at nu without --reward_shaping gives
    the actor (A_R - nu A_C)/(1 + nu), by linearity of GAE the advantage of -beta*k_t +
    [t = end](R - nu C)/(1 + nu): the same trade-off between R and C, but a KL weight of beta(1 + nu)
    relative to R - nu C (101 beta at nu = 100). PPO-Lagrangian is therefore shaping with a moving
    nu = lambda and a KL weight beta(1 + lambda) (evaluate.py's KL optimum uses exactly these).

Left out, on purpose: the score normaliser (the official RL default is off), a reward/cost model
with a different tokenizer than the actor (re-tokenisation), num_return_sequences > 1, gradient
accumulation inside one rl_step (the official default is 1), evaluation during training
(evaluate.py does it), DeepSpeed. Deviations from the official code, each marked where it happens:
sampling without the implicit top_k=50, position ids from the attention mask, gamma and GAE lambda
exposed as arguments, lambda identical on every rank by an all-reduce (not reduce + broadcast).

Run (the toy world, after sft.py, reward.py and cost.py):
    python ppo_lagrangian.py
    torchrun --nproc_per_node 2 ppo_lagrangian.py
Real models on 8 GPUs, the official recipe (safe-rlhf scripts/ppo-lag.sh@82743cc:L148-198; Args.PAPER:
actor PKU-Alignment/alpaca-7b-reproduced, prompts PKU-SafeRLHF/train, PTX on tatsu-lab/alpaca):
    torchrun --nproc_per_node 8 ppo_lagrangian.py --recipe paper --reward_model_name_or_path runs/reward-7b \\
        --cost_model_name_or_path runs/cost-7b --output_dir runs/ppo-lag-7b

Shape letters: B batch (sequences per rank), S padded prompt length, L = S + generated length,
T = L - 1 - start response positions in the RL arrays, V vocabulary.
"""

from __future__ import annotations

import collections
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch

import model as M
import plumbing
from plumbing import UserError

# --------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyArgs:
    """The flags of a policy stage with a Lagrange multiplier: everything but the critics, shared with
    rloo_lagrangian.py (which adds its group size). ppo_lagrangian.py's own Args, below, adds the critics."""
    # Ranges checked at parse time (plumbing.check_limits); any other number must be finite and >= 0.
    LIMITS: ClassVar[dict] = {"max_length": (2, None), "actor_warmup_ratio": (0, 1), "threshold": (None, None),
              "target_unsafe_share": (0, 1), "temperature": (1e-6, None), "lambda_max": (1e-6, None), "epochs": (1e-6, None),
              "adam_beta1": (0, 0.999999), "adam_beta2": (0, 0.999999), **dict.fromkeys(
        ("per_device_prompt_batch_size", "per_device_train_batch_size", "update_iters", "limit",
         "episode_cost_window_size", "log_every"), (1, None))}
    # --recipe paper: the official 7B settings (safe-rlhf scripts/ppo-lag.sh@82743cc:L148-198), critics' aside
    PAPER: ClassVar[dict] = {
        "actor_model_name_or_path": "PKU-Alignment/alpaca-7b-reproduced", "dataset": "PKU-Alignment/PKU-SafeRLHF",
        "split": "train", "max_length": 512, "temperature": 1.0, "epochs": 1, "per_device_prompt_batch_size": 16,
        "per_device_train_batch_size": 16, "update_iters": 1, "actor_lr": 1e-5, "actor_weight_decay": 0.01,
        "actor_lr_scheduler": "cosine", "actor_warmup_ratio": 0.03, "kl_coeff": 0.01, "clip_range_ratio": 0.2,
        "clip_range_score": 50.0, "ptx_dataset": "tatsu-lab/alpaca", "ptx_coeff": 16.0, "threshold": 0.0,
        "lambda_init": 1.0, "lambda_lr": 0.1, "lambda_max": 5.0, "lambda_update_delay_steps": 0,
        "episode_cost_window_size": 128, "gradient_checkpointing": True}
    PAPER_SOURCE: ClassVar[str] = "safe-rlhf scripts/ppo-lag.sh@82743cc:L148-198"
    DATA_FLAGS: ClassVar[tuple] = ("dataset", "ptx_dataset")

    recipe: str = ""
    """toy (the toy world's settings: the defaults listed without --recipe) or paper (the official 7B
    settings; --recipe paper --help lists them); default toy when the data are the toy world's, else required"""

    # models
    actor_model_name_or_path: str = "runs/sft"
    """the SFT policy: initialises the actor and the frozen reference (paper PKU-Alignment/alpaca-7b-reproduced)"""
    reward_model_name_or_path: str = "runs/reward"
    """the trained reward model (reward.py), frozen"""
    cost_model_name_or_path: str = "runs/cost"
    """the trained cost model (cost.py), frozen"""
    tokenizer_name_or_path: str | None = None
    """default: the actor's folder (needed when the models are model.py presets, e.g. in tools/bench.py)"""
    trust_remote_code: bool = False
    """allow model code from the hub (off: only transformers' own architectures)"""
    # data
    dataset: str = "data/toy/prompts"
    """prompt set: hub name (PKU-Alignment/PKU-SafeRLHF) or local JSON/JSONL file or folder"""
    split: str = "train"
    """split of --dataset"""
    revision: str | None = None
    """hub revision of --dataset"""
    prompt_field: str = "prompt"
    """column holding the raw request (the template is applied here)"""
    limit: int | None = None
    """use at most this many rows of --dataset"""
    strict: bool = False
    """refuse the prompts if any row is unusable (empty; a repeat is dropped as the official loader does)"""
    # rollout
    max_length: int = 96
    """prompt + response tokens at most (paper 512; the toy world's answers are short)"""
    temperature: float = 1.0
    """sampling temperature; log-probs use the same temperature"""
    missing_eos_penalty: float = 0.0
    """subtracted from R (added to C) when a response hits max_length without EOS; 0 = off, as official"""
    # sizes
    epochs: float = 40
    """passes over the prompt set, fractions allowed (paper 1 over PKU-SafeRLHF; the toy set has few prompts)"""
    max_steps: int = 0
    """rl_steps of the whole run, rounded up to whole rollouts; overrides --epochs (0: --epochs decides)"""
    per_device_prompt_batch_size: int = 16
    """prompts per rank per rollout"""
    per_device_train_batch_size: int = 16
    """sequences per rank per rl_step (one optimiser step of each trained model)"""
    update_iters: int = 1
    """PPO epochs over each rollout batch"""
    # PPO
    actor_lr: float = 5e-4
    """actor learning rate (paper 1e-5; a random-init toy model needs more)"""
    actor_weight_decay: float = 0.0
    """actor AdamW weight decay (paper 0.01)"""
    actor_lr_scheduler: str = "cosine"
    """cosine, linear or constant (paper cosine)"""
    actor_warmup_ratio: float = 0.03
    """fraction of steps with linear warmup (paper 0.03)"""
    adam_beta1: float = 0.9
    """AdamW beta1 of every trained model (official 0.9, safe_rlhf/configs/constants.py@82743cc:L53)"""
    adam_beta2: float = 0.95
    """AdamW beta2 (official 0.95)"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (official 1e-8)"""
    kl_coeff: float = 0.1
    """beta: per-token KL penalty, -beta*k in the reward stream, +beta*k in the cost stream (paper 0.01;
    the toy reward model is easy for a tiny policy to exploit, 0.1 keeps it near the SFT's language)"""
    clip_range_ratio: float = 0.2
    """PPO ratio clip epsilon"""
    clip_range_score: float = 50.0
    """clip of every per-token reward / cost entry"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip for every trained model"""
    ptx_dataset: str | None = None
    """optional SFT-style data (alpaca schema) for the PTX loss ("" or none: off); toy: off (paper tatsu-lab/alpaca)"""
    ptx_coeff: float = 16.0
    """weight of the PTX loss when --ptx_dataset is given (paper 16)"""
    # Lagrange multiplier (eq. 12)
    # The threshold lives on the cost model's scale, which moves from one trained cost model to the
    # next; so by default it is derived from the cost model, not typed in (derived_threshold): a target
    # share u of unsafe answers on the prompt mix gives E[C] = (1 - u) E[C | safe] + u E[C | unsafe],
    # both means measured by cost.py on its held-out labelled responses. The toy world's target is 5%
    # unsafe answers to harmful requests; half its RL prompts are benign: u = 2.5% of all answers.
    threshold: float | None = None
    """the constraint is E[C] <= threshold (= -d in the paper); paper 0.0; default: derived from
    --target_unsafe_share and the cost model's calibration (see above)"""
    target_unsafe_share: float = 0.025
    """with --threshold none (the toy default): the share of unsafe answers on the prompt mix the constraint aims at"""
    lambda_init: float = 1.0
    """initial lambda; with --lambda_lr 0 it stays fixed (reward shaping; 0 = plain PPO); paper 1"""
    lambda_lr: float = 0.1
    """SGD learning rate on log(lambda) (paper 0.1)"""
    lambda_max: float | None = 5.0
    """upper bound on lambda (paper 5); none below: lambda = exp(log lambda) > 0"""
    reward_shaping: bool = False
    """the paper's reward-shaping baseline: one stream -beta*k_t + [t = end](R - nu*C) with nu = --lambda_init
    (needs --lambda_lr 0), plain PPO on it (see the module docstring and shaped_score)"""
    lambda_update_delay_steps: int = 0
    """no lambda update before this many rl_steps"""
    episode_cost_window_size: int = 128
    """J_C = mean of the last this-many raw episode costs on each rank, averaged over ranks"""
    # run
    seed: int = 42
    """seed (same on every rank for weights; seed + rank for sampling and data order)"""
    output_dir: str = "runs/ppo_lagrangian"
    """the actor (HF format) at the root, critics in reward_critic/ and cost_critic/"""
    save_every: int = 50
    """rl_steps between resumable checkpoints (0 = only at the end)"""
    resume: bool = False
    """continue the interrupted run in --output_dir"""
    overwrite: bool = False
    """replace the run already in --output_dir (refused without it; nothing is deleted before the inputs are checked)"""
    stop_at_step: int | None = None
    """stop after this rl_step and save (split a long run into jobs; schedules stay sized for the whole run)"""
    save: bool = True
    """write checkpoints (--no-save: metrics only, for benchmarks and dry runs)"""
    log_every: int = 10
    """rl_steps between log lines (with throughput and ETA)"""
    sample_every: int = 50
    """rl_steps between printed sample tables"""
    gradient_checkpointing: bool = False
    """activation checkpointing in the trained models (paper on)"""
    device: str = "auto"
    """auto (CUDA if present), cpu or cuda"""
    # derived (filled in after parsing; logged with the config)
    world_size: int = 0
    """(derived) number of ranks"""
    steps_per_rollout: int = 0
    """(derived) rl_steps per rollout batch = update_iters * prompt batch / train batch"""
    total_steps: int = 0
    """(derived) rl_steps in the whole run"""



@dataclass
class Args(PolicyArgs):
    LIMITS: ClassVar[dict] = {**PolicyArgs.LIMITS, "gamma": (0, 1), "gae_lambda": (0, 1)}
    PAPER: ClassVar[dict] = {**PolicyArgs.PAPER, "critic_lr": 5e-6, "critic_weight_decay": 0.0,
                             "critic_lr_scheduler": "constant", "clip_range_value": 5.0}

    # critics: a value model per signal, initialised from its score model (what rloo_lagrangian.py drops)
    reward_critic_model_name_or_path: str | None = None
    """reward critic init; default: the reward model (head included,
    safe_rlhf/trainers/rl_trainer.py@82743cc:L162-175)"""
    cost_critic_model_name_or_path: str | None = None
    """cost critic init; default: the cost model"""
    critic_lr: float = 5e-4
    """critics' learning rate (paper 5e-6)"""
    critic_weight_decay: float = 0.0
    """critics' AdamW weight decay (paper 0.0)"""
    critic_lr_scheduler: str = "constant"
    """cosine, linear or constant (paper constant, which ignores warmup)"""
    clip_range_value: float = 5.0
    """critic value clip around the old values"""
    gamma: float = 1.0
    """discount (hard-coded 1.0 in the official code)"""
    gae_lambda: float = 0.95
    """GAE lambda (hard-coded 0.95 in the official code)"""


# --------------------------------------------------------------------------------------------
# The math, as small pure functions (what the tests import and auditors read first)
# --------------------------------------------------------------------------------------------


def end_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real action in each row. (B, T) 0/1 -> (B,)  (docs/reference.md, "Rollout and indices")."""
    return M.last_attended_index(mask)


def per_token_rewards_and_costs(reward: torch.Tensor, cost: torch.Tensor, old_logprobs: torch.Tensor,
                                ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coeff: float,
                                clip_range_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward and cost with the KL penalty (safe_rlhf/algorithms/ppo_lag/trainer.py@82743cc:L258-287;
    fix 2c1799f):

        r_t = clip(-beta * k_t + [t = end] * R, -c_s, c_s)
        c_t = clip(+beta * k_t + [t = end] * C, -c_s, c_s),   k_t = log pi_old(a_t) - log pi_ref(a_t)

    k_t is the single-sample log-ratio estimator of KL(pi || pi_ref) (the same one is logged).
    The penalty enters the reward stream with -beta and the cost stream with +beta, so the actor's
    combined advantage (A_R - lambda A_C)/(1 + lambda) carries exactly -beta*k whatever lambda is.
    The score is added at the last real token only; positions after it are zeroed by the mask. A row
    with no real token (its first sampled token was PAD, which M.sample masks out) gets nothing: no
    action to credit, so no gradient; its cost still enters the episode-cost window.

    reward, cost: (B,); old_logprobs, ref_logprobs, mask: (B, T). Returns rewards, costs (B, T).
    """
    kl = old_logprobs - ref_logprobs                                             # (B, T)
    end = end_indices(mask).clamp(min=0)                                         # (B,) -1 (empty row) -> 0, masked below
    at_end = torch.zeros_like(kl).scatter_(1, end[:, None], 1.0)                 # (B, T) one-hot
    rewards = (-kl_coeff * kl + at_end * reward[:, None]).clamp(-clip_range_score, clip_range_score)  # (B, T)
    costs = (kl_coeff * kl + at_end * cost[:, None]).clamp(-clip_range_score, clip_range_score)       # (B, T)
    return rewards * mask, costs * mask


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016;
    safe_rlhf/trainers/rl_trainer.py@82743cc:L630-651) on masked arrays.

        V_t, r_t masked first (zero after the end), V_T := 0, A_T := 0,
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lambda * A_{t+1}
        G_t     = A_t + V_t          (returns from the OLD values; advantages are not whitened)

    At t = end, delta = r_end - V_end (terminal, no bootstrap). values, rewards, mask: (B, T).
    Returns advantages (B, T) and returns (B, T), detached.
    """
    values, rewards = values * mask, rewards * mask                              # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)                                       # (B, T)
    last = torch.zeros_like(rewards[:, 0])                                       # (B,)  A_{t+1}
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]                # (B,)
        last = delta + gamma * gae_lambda * last                                 # (B,)
        advantages[:, t] = last
    returns = advantages + values                                                # (B, T)
    return advantages.detach(), returns.detach()


def combined_advantage(reward_advantages: torch.Tensor, cost_advantages: torch.Tensor,
                       lagrange_multiplier: float) -> torch.Tensor:
    """(A_R - lambda * A_C) / (1 + lambda) (paper eq. 12's primal step;
    safe_rlhf/algorithms/ppo_lag/trainer.py@82743cc:L289-309).
    The 1/(1+lambda) is a positive rescaling that keeps the advantage bounded as lambda grows.
    (B, T), (B, T), float -> (B, T); rloo_lagrangian.py passes sequence advantages (B,), (B,) -> (B,)"""
    return (reward_advantages - lagrange_multiplier * cost_advantages) / (1.0 + lagrange_multiplier)


def actor_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, clip_range_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (safe_rlhf/algorithms/ppo/trainer.py@82743cc:L127-143):
        L = -masked_sequence_mean( min(rho A, clip(rho, 1-eps, 1+eps) A) ),  rho = exp(logp - logp_old)
    Per-sequence token mean, then batch mean (official since e64d1bc). (B, T) each -> loss (),
    and the fraction of real tokens whose ratio was clipped (a diagnostic)."""
    ratio = torch.exp(logprobs - old_logprobs)                                   # (B, T)
    surrogate = ratio * advantages                                               # (B, T)
    clipped = ratio.clamp(1.0 - clip_range_ratio, 1.0 + clip_range_ratio) * advantages  # (B, T)
    loss = -M.masked_sequence_mean(torch.minimum(surrogate, clipped), mask)      # ()
    clip_fraction = M.masked_mean((surrogate > clipped).float(), mask)           # ()
    return loss, clip_fraction.detach()


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                mask: torch.Tensor, clip_range_value: float) -> torch.Tensor:
    """Clipped value loss (safe_rlhf/trainers/rl_trainer.py@82743cc:L653-669):
        V_clip = clip(V, V_old - eps_v, V_old + eps_v)
        L = 1/2 * masked_sequence_mean( max((V - G)^2, (V_clip - G)^2) )
    (B, T) each -> ()"""
    values_clipped = torch.maximum(torch.minimum(values, old_values + clip_range_value),
                                   old_values - clip_range_value)                # (B, T)
    losses = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)  # (B, T)
    return 0.5 * M.masked_sequence_mean(losses, mask)                           # ()


def ptx_loss(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PTX: the SFT loss (token mean NLL of the response tokens) on supervised data, added to the
    actor loss to keep the policy's language ability (safe_rlhf/trainers/rl_trainer.py@82743cc:L456-470; paper
    appendix).
    logprobs: (B, L-1) with the one-token shift; labels: (B, L), IGNORE_INDEX where no loss."""
    target_mask = (labels[:, 1:] != M.IGNORE_INDEX).float()                  # (B, L-1)
    return -(logprobs * target_mask).sum() / target_mask.sum().clamp(min=1)  # ()


def shaped_score(reward: torch.Tensor, cost: torch.Tensor, nu: float) -> torch.Tensor:
    """The reward-shaping baseline's end-of-response score R - nu*C (paper section 4.2.3;
    safe_rlhf/algorithms/ppo_reward_shaping/trainer.py@82743cc:L39-303). It takes R's place in the reward
    stream, so the per-token reward is clip(-beta*k_t + [t = end](R - nu C)) with the same beta as Safe
    RLHF, and the actor's advantage is that stream's GAE alone. reward, cost: (B,) -> (B,)"""
    return reward - nu * cost


def derived_threshold(cost_model: str, target_unsafe_share: float) -> tuple[float, str]:
    """The threshold d' for a target share u of unsafe answers (safe-rlhf#59, #171 ask how to pick it):
        d' = (1 - u) * E[C | safe] + u * E[C | unsafe],
    the expected cost of a policy whose answers are unsafe with probability u and otherwise cost what
    a safe answer costs. The two conditional means are measured by cost.py on its held-out labelled
    responses (eval.json, `eval/safe_cost_mean` and `eval/unsafe_cost_mean`). Returns (d', how)."""
    path = Path(cost_model) / "eval.json"
    try:
        ev = json.loads(path.read_text())
        safe, unsafe = float(ev["eval/safe_cost_mean"]), float(ev["eval/unsafe_cost_mean"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--cost_model_name_or_path {cost_model}: no calibration to derive the threshold from ({path} "
                        "with eval/safe_cost_mean and eval/unsafe_cost_mean, written by cost.py's evaluation on "
                        "labelled held-out pairs); give --threshold") from None
    threshold = (1 - target_unsafe_share) * safe + target_unsafe_share * unsafe
    return threshold, (f"threshold {threshold:+.3f} = (1 - {target_unsafe_share:g}) x {safe:+.3f} (mean C of safe answers) "
                       f"+ {target_unsafe_share:g} x {unsafe:+.3f} (mean C of unsafe ones), from {path}")


def lagrange_multiplier_loss(log_lambda: torch.Tensor, episode_cost: float, threshold: float) -> torch.Tensor:
    """The lambda part of the dual (eq. 12), to be MINIMISED by SGD on log(lambda):
        loss(log lambda) = -(J_C - threshold) * exp(log lambda)
    Its gradient is -(J_C - threshold) * lambda, so one SGD step of size alpha gives
        log lambda <- log lambda + alpha * lambda * (J_C - threshold)     (paper eq. 31)
    lambda rises while the cost is above the threshold and falls below it; lambda = exp(.) > 0."""
    return -(episode_cost - threshold) * log_lambda.exp()


# --------------------------------------------------------------------------------------------
# Diagnostics: the metrics of one rl_step (their names are explained in docs/metrics.md)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def step_record(step: int, epoch: int, micro: dict[str, torch.Tensor], losses: dict[str, torch.Tensor],
                first_pass: bool, lagrange_multiplier: float, episode_cost: float, threshold: float) -> dict:
    """The record of one rl_step, every statistic averaged over ranks (one all-reduce).
    micro: this micro-batch's reward, cost, has_eos (b,) and old_logprobs, ref_logprobs, rewards,
    costs, reward_advantages, cost_advantages, mask (b, T). losses: actor_step's output (the actor's
    loss, its clip fraction and max |log ratio|, PTX's loss) plus the critics' losses, each logged as
    loss/<name>. first_pass: the rollout's first micro-batch, before any update from it, where the max
    |log ratio| must be 0 (logged as policy/first_pass_logratio_max on those rl_steps only)."""
    m = micro["mask"]
    per_sequence = lambda x: (x * m).sum(1).mean()  # noqa: E731  summed over the response, mean over sequences
    stats = {
        "objective/reward": micro["reward"].mean(), "objective/cost": micro["cost"].mean(),
        "objective/kl": per_sequence(micro["old_logprobs"] - micro["ref_logprobs"]),
        "objective/reward_with_kl_penalty": per_sequence(micro["rewards"]),
        "objective/cost_with_kl_penalty": per_sequence(micro["costs"]),
        "policy/reward_advantage_mean": M.masked_mean(micro["reward_advantages"], m),
        "policy/cost_advantage_mean": M.masked_mean(micro["cost_advantages"], m),
        **{f"loss/{k}": v.detach() for k, v in losses.items() if k not in ("clip_fraction", "logratio_max")},
        "policy/clip_fraction": losses["clip_fraction"],
        "policy/response_length": m.sum(1).mean(), "policy/missing_eos_rate": (~micro["has_eos"]).float().mean(),
        "policy/first_pass_logratio_max": losses["logratio_max"],
    }
    record = dict(zip(stats, M.all_reduce(torch.stack(list(stats.values())), "mean").tolist()))
    if not first_pass:
        del record["policy/first_pass_logratio_max"]
    record.update({"step": step, "epoch": epoch, "lagrangian/lambda": lagrange_multiplier,
                   "lagrangian/episode_cost": episode_cost, "lagrangian/constraint_violation": episode_cost - threshold})
    return record


def step_line(record: dict) -> str:
    """The plain log line of an rl_step."""
    r, t = record, {k: record[f"time/{k}"] for k in ("generation", "scoring", "training")}
    return (f"step {r['step']} | reward {r['objective/reward']:+.3f} | cost {r['objective/cost']:+.3f} | "
            f"J_C {r['lagrangian/episode_cost']:+.3f} | lambda {r['lagrangian/lambda']:.3f} | "
            f"kl {r['objective/kl']:.3f} | len {r['policy/response_length']:.1f} | lr {r['lr/actor']:.2e} | "
            f"gen {t['generation']:.2f}s score {t['scoring']:.2f}s train {t['training']:.2f}s"
            + (f" | {r['perf/tokens_per_s']:,.0f} tokens/s {r['perf/sequences_per_s']:.1f} seq/s "
               f"{r['perf/rl_steps_per_s']:.3g} rl_steps/s | step {r['perf/step_time_s']:.2f}s | eta {r['perf/eta_s']:.0f}s"
               if "perf/tokens_per_s" in r else ""))


# --------------------------------------------------------------------------------------------
# Data: unique prompts, left-padded for generation
# --------------------------------------------------------------------------------------------


def load_prompts(args: Args, summary: plumbing.DataSummary) -> list[str]:
    """The unique non-empty prompts of --dataset. Repeats are dropped keeping the last occurrence's
    position, as the official PromptOnlyDataset (safe_rlhf/datasets/prompt_only.py@82743cc:L45-80);
    empty prompts and the repeats are counted in `summary`."""
    if args.dataset == "data/toy/prompts":
        import toyworld
        toyworld.ensure_toy_data("data/toy")
    rows = plumbing.load_rows(args.dataset, args.split, revision=args.revision, limit=args.limit,
                              required=(args.prompt_field,), text=(args.prompt_field,))
    summary.read = len(rows)
    last = {row[args.prompt_field]: i for i, row in enumerate(rows) if row[args.prompt_field].strip()}
    for i, row in enumerate(rows):
        if not row[args.prompt_field].strip():
            summary.drop("empty prompt", i)
        elif last[row[args.prompt_field]] != i:
            summary.drop("duplicate", i)
    return [p for p, _ in sorted(last.items(), key=lambda kv: kv[1])]


def load_ptx(args: Args, tokenizer, summaries: dict) -> list[dict] | None:
    """The PTX rows (alpaca schema), read and tokenised once as sft.py reads its data (sft.load_examples,
    no de-duplication); None without --ptx_dataset ("" or none: no PTX, which --recipe paper otherwise
    sets). Unusable rows are dropped and counted in summaries["ptx"]."""
    if not args.ptx_dataset or args.ptx_dataset.lower() == "none":
        return None
    import sft  # the SFT data loader (only needed with PTX)
    summaries["ptx"] = plumbing.DataSummary("--ptx_dataset", args.ptx_dataset, "train")
    examples, _ = sft.load_examples(args.ptx_dataset, "train", tokenizer, max_length=args.max_length,
                                    flag="--ptx_dataset", summary=summaries["ptx"])
    return examples


# --------------------------------------------------------------------------------------------
# The loop's phases, one function each (rloo_lagrangian.py, the critic-free variant, calls the same ones)
# --------------------------------------------------------------------------------------------


def check_args(args: PolicyArgs, d: M.Dist, sequences_per_prompt: int = 1) -> str | None:
    """The checks and derived sizes of a policy stage, before anything is read or written; the
    derived threshold is read here too, so a resumed run derives the same number. Returns how the
    threshold was derived (None when --threshold was given)."""
    args.world_size = d.world_size
    sequences = args.per_device_prompt_batch_size * sequences_per_prompt    # sequences per rank per rollout
    if sequences % args.per_device_train_batch_size:
        raise UserError(f"--per_device_prompt_batch_size {args.per_device_prompt_batch_size}"
                        + (f" x --samples_per_prompt {sequences_per_prompt} = {sequences} sequences"
                           if sequences_per_prompt > 1 else "")
                        + f" must be a multiple of --per_device_train_batch_size {args.per_device_train_batch_size}")
    if args.reward_shaping and args.lambda_lr != 0:
        raise UserError(f"--reward_shaping keeps nu = --lambda_init fixed: give --lambda_lr 0 (not {args.lambda_lr})")
    if args.lambda_init == 0 and args.lambda_lr > 0:
        M.print0("warning: --lambda_init 0 stays 0 whatever --lambda_lr is (lambda is updated as log lambda); "
                 "give a small positive --lambda_init for the Lagrangian, or --lambda_lr 0 for the unconstrained baseline")
    args.steps_per_rollout = args.update_iters * sequences // args.per_device_train_batch_size
    if args.threshold is None:
        args.threshold, derivation = derived_threshold(args.cost_model_name_or_path, args.target_unsafe_share)
        return derivation
    return None


def load_data(args: PolicyArgs, d: M.Dist) -> tuple:
    """Tokenizer, unique prompts and PTX rows, validated before anything is written; the run's size.
    Returns tokenizer, prompts, ptx_examples (or None), the data summary, rollouts per epoch and in all;
    sets args.total_steps."""
    actor_path = args.output_dir if args.resume else args.actor_model_name_or_path
    tokenizer = M.load_tokenizer(args.tokenizer_name_or_path or actor_path, "left", args.trust_remote_code)
    summaries = {"train": plumbing.DataSummary("--dataset", args.dataset, args.split)}
    prompts = load_prompts(args, summaries["train"])
    # a prompt longer than max_length // 2 tokens keeps its last ones (M.encode_prompts): counted, not dropped
    summaries["train"].stats["truncated_prompts"] = sum(
        len(ids) > args.max_length // 2 for ids in tokenizer([M.format_prompt(p) for p in prompts])["input_ids"])
    ptx_examples = load_ptx(args, tokenizer, summaries)
    data_summary = plumbing.report_data(summaries, args.strict, d.is_main)
    global_prompt_batch = args.per_device_prompt_batch_size * d.world_size
    rollouts_per_epoch = len(prompts) // global_prompt_batch
    if rollouts_per_epoch == 0:
        raise UserError(f"--dataset {args.dataset}: {len(prompts)} unique prompts, fewer than one global "
                        f"prompt batch ({global_prompt_batch}); lower --per_device_prompt_batch_size")
    total_rollouts = (math.ceil(args.max_steps / args.steps_per_rollout) if args.max_steps
                      else int(args.epochs * rollouts_per_epoch))
    if total_rollouts == 0:
        raise UserError(f"--epochs {args.epochs}: less than one rollout ({rollouts_per_epoch} per epoch)")
    args.total_steps = total_rollouts * args.steps_per_rollout
    return tokenizer, prompts, ptx_examples, data_summary, rollouts_per_epoch, total_rollouts


HINT = {"sft": "run sft.py first", "reward": "run reward.py first", "cost": "run cost.py first"}


def load_models(args: PolicyArgs, d: M.Dist, tokenizer, **load) -> tuple:
    """The four models every policy stage holds, unprepared: the actor (from --output_dir on resume),
    the frozen reference (the SFT policy) and the frozen reward and cost models. Each model must be the
    kind its slot takes (a cost model as the reward model is refused, not trained on), and the frozen
    scorers must share the actor's tokenizer. load: model.py's loading options (dtype, meta, ...)."""
    M.seed_everything(args.seed)  # same on every rank: identical initial weights
    actor = M.load_causal_lm(args.output_dir if args.resume else args.actor_model_name_or_path, tokenizer,
                             stage_hint=HINT["sft"], flag="--output_dir" if args.resume else "--actor_model_name_or_path",
                             **load)
    M.seed_everything(args.seed)  # a preset (random-init) actor and its reference are then the same model
    reference = M.load_causal_lm(args.actor_model_name_or_path, tokenizer, stage_hint=HINT["sft"],
                                 flag="--actor_model_name_or_path", **load)
    for flag, path in (("--reward_model_name_or_path", args.reward_model_name_or_path),
                       ("--cost_model_name_or_path", args.cost_model_name_or_path)):
        M.check_same_vocabulary(tokenizer, path, flag, args.trust_remote_code)
    reward_model = M.load_score_model(args.reward_model_name_or_path, tokenizer, "reward", stage_hint=HINT["reward"],
                                      accept=("reward",), flag="--reward_model_name_or_path", **load)
    cost_model = M.load_score_model(args.cost_model_name_or_path, tokenizer, "cost", stage_hint=HINT["cost"],
                                    accept=("cost",), flag="--cost_model_name_or_path", **load)
    if reward_model.config.vocab_size != actor.config.vocab_size or cost_model.config.vocab_size != actor.config.vocab_size:
        raise UserError("the reward/cost models' vocabulary differs from the actor's: they must share its tokenizer "
                        "(re-tokenisation for a different tokenizer is not implemented)")
    return actor, reference, reward_model, cost_model


def make_lambda(args: PolicyArgs, d: M.Dist) -> tuple:
    """log(lambda) as a parameter, its SGD optimiser, and this rank's window of raw episode costs."""
    log_lambda = torch.nn.Parameter(torch.tensor(math.log(args.lambda_init) if args.lambda_init > 0 else -math.inf,
                                                 device=d.device))
    return (log_lambda, torch.optim.SGD([log_lambda], lr=args.lambda_lr),
            collections.deque(maxlen=args.episode_cost_window_size))


def open_logs(args: PolicyArgs, d: M.Dist, step: int, data_summary: dict) -> tuple:
    """The run folder's logs: a fresh run (--overwrite) replaces an older one's, a resumed run drops what
    the killed run logged past its checkpoint; args.json and data_summary.json. Returns the two loggers."""
    out = Path(args.output_dir)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            for name in ("metrics.jsonl", "samples.jsonl"):
                (out / name).unlink(missing_ok=True)
        else:
            plumbing.trim_logs(out, step)
        (out / "args.json").write_text(json.dumps(asdict(args), indent=1) + "\n")
        plumbing.write_json_atomic(out / "data_summary.json", data_summary)
    return plumbing.JsonlLogger(out / "metrics.jsonl", d.is_main), plumbing.JsonlLogger(out / "samples.jsonl", d.is_main)


def save_run(args: PolicyArgs, d: M.Dist, tokenizer, trained: dict, log_lambda: torch.Tensor,
             episode_costs: collections.deque, position: dict, stage: str) -> None:
    """A resumable checkpoint: every trained model (trained: {name: (model, optimizer, scheduler)}; the
    actor at the folder's root, the others in subfolders), their optimiser and scheduler states, every
    rank's RNG and episode-cost window, log(lambda), the loop position, and which stage wrote it.
    The per-rank lambdas are gathered too (they must all be equal: checked by the tests)."""
    per_rank = [(list(episode_costs), log_lambda.item())] * d.world_size
    if d.enabled:
        torch.distributed.all_gather_object(per_rank, (list(episode_costs), log_lambda.item()))
    state = plumbing.merge_states(
        *(plumbing.optimizer_state(model, opt, name) for name, (model, opt, _) in trained.items()),
        plumbing.gather_rng_states(d),
        {"tensors": {"log_lambda": log_lambda.detach().cpu().reshape(())},
         "json": {**{f"{name}.scheduler": sched.state_dict() for name, (_, _, sched) in trained.items()},
                  "episode_costs": [c for c, _ in per_rank], **position, "stage": stage,
                  "log_lambda_per_rank": [l for _, l in per_rank]}})
    M.save_checkpoint(args.output_dir, d, tokenizer,
                      {"" if name == "actor" else name: model for name, (model, _, _) in trained.items()},
                      train_state=state)


def start_run(args: PolicyArgs, d: M.Dist, state: dict | None, trained: dict, log_lambda: torch.Tensor,
              episode_costs: collections.deque) -> tuple[int, dict]:
    """A fresh run seeds sampling per rank; --resume restores what save_run wrote on this rank
    (plumbing.open_run_folder has checked that this stage wrote it). Returns the rl_step and the loop
    position {"epoch", "rollout_in_epoch"} that rollout_batches continues from."""
    if state is None:
        M.seed_everything(args.seed + d.rank)  # per rank: different samples on every rank
        return 0, {"epoch": 0, "rollout_in_epoch": 0}
    for name, (model, opt, sched) in trained.items():
        plumbing.load_optimizer_state(model, opt, name, state)
        sched.load_state_dict(state["json"][f"{name}.scheduler"])
    with torch.no_grad():
        log_lambda.copy_(state["tensors"]["log_lambda"])
    episode_costs.extend(state["json"]["episode_costs"][d.rank])
    plumbing.restore_rng_states(state, d)
    M.print0(f"resumed from {args.output_dir} at rl_step {state['json']['step']}")
    return state["json"]["step"], {"epoch": state["json"]["epoch"], "rollout_in_epoch": state["json"]["rollout_in_epoch"]}


def rollout_batches(args: PolicyArgs, d: M.Dist, prompts: list[str], position: dict, rollouts_per_epoch: int,
                    total_rollouts: int):
    """The loop over rollouts: yields (epoch, this rank's prompts) for every rollout left. The order is
    shuffled per epoch with the same seed on every rank, and each rank takes its slice of a global
    batch. position {"epoch", "rollout_in_epoch"} counts a rollout as done when it is handed out (what a
    save at its end records), so a resumed run continues with the next one."""
    global_prompt_batch = args.per_device_prompt_batch_size * d.world_size
    while position["epoch"] * rollouts_per_epoch + position["rollout_in_epoch"] < total_rollouts:
        epoch = position["epoch"]
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
        while position["rollout_in_epoch"] < rollouts_per_epoch and \
                epoch * rollouts_per_epoch + position["rollout_in_epoch"] < total_rollouts:
            first = position["rollout_in_epoch"] * global_prompt_batch + d.rank * args.per_device_prompt_batch_size
            position["rollout_in_epoch"] += 1
            yield epoch, [prompts[i] for i in order[first:first + args.per_device_prompt_batch_size]]
        if position["rollout_in_epoch"] >= rollouts_per_epoch:
            position["epoch"], position["rollout_in_epoch"] = epoch + 1, 0


def checkpoint_due(args: PolicyArgs, step: int) -> bool:
    """A resumable checkpoint at the end of the rollout in which rl_step crossed a multiple of
    --save_every (0: none until the end of the run, which saves anyway)."""
    return bool(args.save_every) and step % args.save_every < args.steps_per_rollout and step < args.total_steps


def generate(args: PolicyArgs, d: M.Dist, tokenizer, actor, batch_prompts: list[str],
             samples_per_prompt: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rollout: sample a response to each prompt (each prompt samples_per_prompt times, the copies next
    to each other) from the actor, exactly: temperature only, no top-k. Template + left padding; prompts
    keep their last max_length // 2 tokens, and every rank pads to the longest prompt on ANY rank: the
    same S, so the same generation budget. Returns sequences, attention_mask (B, L) and S."""
    rows = M.encode_prompts(tokenizer, batch_prompts, args.max_length // 2)
    rows = [row for row in rows for _ in range(samples_per_prompt)]          # prompt i at rows i*K ... i*K+K-1
    S = int(M.all_reduce(torch.tensor(max(map(len, rows)), device=d.device), "max").item())  # NCCL: on the GPU
    prompt_ids, prompt_mask = (t.to(d.device) for t in M.left_pad(rows, tokenizer.pad_token_id, length=S))
    # all-gather the actor once for the whole generation; bf16 compute on a single GPU (M.autocast)
    with M.gathered_weights(actor), M.autocast(d):
        sequences, attention_mask = M.sample(
            actor, prompt_ids, prompt_mask, max_new_tokens=max(1, args.max_length - S),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            temperature=args.temperature)  # (B, L), (B, L): masks built once, here
    return sequences, attention_mask, S


@torch.no_grad()
def score(args: PolicyArgs, d: M.Dist, tokenizer, sequences: torch.Tensor, attention_mask: torch.Tensor, S: int,
          actor, reference, reward_model, cost_model) -> dict[str, torch.Tensor]:
    """Score the rollout and record the old policy (no grad), response positions only (T = L - S):
    reward, cost, has_eos (B,); old_logprobs, ref_logprobs, mask (B, T)."""
    with M.autocast(d):
        # a. EOS truncation happened in sampling (PAD after EOS, mask 0 there).
        has_eos = (sequences[:, S:] == tokenizer.eos_token_id).any(dim=1)            # (B,)
        # b. reward and cost read at the last real token (the EOS, or the last token at max_length)
        reward = reward_model(sequences, attention_mask).end_scores                   # (B,)
        cost = cost_model(sequences, attention_mask).end_scores                       # (B,)
        # c. optional penalty for a missing EOS (0 by default, as the official code)
        reward = reward - args.missing_eos_penalty * (~has_eos).float()
        cost = cost + args.missing_eos_penalty * (~has_eos).float()
        # d. log-probs of the rollout policy and of the reference (temperature included)
        old_logprobs = M.policy_logprobs(actor, sequences, attention_mask, args.temperature)      # (B, L-1)
        ref_logprobs = M.policy_logprobs(reference, sequences, attention_mask, args.temperature)  # (B, L-1)
    start = S - 1                                        # logp[:, start] is the first generated token
    return dict(reward=reward, cost=cost, has_eos=has_eos, old_logprobs=old_logprobs[:, start:],
                ref_logprobs=ref_logprobs[:, start:], mask=attention_mask[:, 1:][:, start:].float())  # (B, T)


def dual_step(args: PolicyArgs, d: M.Dist, log_lambda: torch.Tensor, lambda_opt, episode_costs, step: int) -> tuple:
    """The dual step (eq. 12), before each actor update: J_C from the episode-cost window, averaged over
    ranks (the same lambda on every rank), one SGD step on log(lambda) (after the delay), the cap.
    Returns lambda (a constant in the actor loss) and the episode cost."""
    episode_cost = M.all_reduce(torch.tensor(sum(episode_costs) / len(episode_costs), device=d.device), "mean").item()
    if args.lambda_lr > 0 and step >= args.lambda_update_delay_steps:
        lambda_opt.zero_grad()
        lagrange_multiplier_loss(log_lambda, episode_cost, args.threshold).backward()
        lambda_opt.step()
        if args.lambda_max is not None:
            with torch.no_grad():
                log_lambda.clamp_(max=math.log(args.lambda_max))
    return log_lambda.exp().item(), episode_cost


def actor_step(args: PolicyArgs, d: M.Dist, tokenizer, actor, actor_opt, actor_sched, seq: torch.Tensor, am: torch.Tensor,
               start: int, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               ptx_examples: list | None, step: int) -> dict[str, torch.Tensor]:
    """One actor update on a micro-batch: the clipped surrogate on its per-token ratios (plus the PTX
    loss when --ptx_dataset is set), gradient clip, AdamW and scheduler steps. seq, am: (b, L);
    old_logprobs, advantages, mask: (b, T). Returns the losses, the clip fraction and the largest |log
    ratio| (exactly 0 on a rollout's first pass, when the weights are those that sampled it)."""
    with M.autocast(d):
        logprobs = M.policy_logprobs(actor, seq, am, args.temperature)[:, start:]  # (b, T)
    loss_actor, clip_fraction = actor_loss(logprobs, old_logprobs, advantages, mask, args.clip_range_ratio)
    plumbing.check_finite(loss_actor, "actor loss", step)
    out = {"actor": loss_actor, "clip_fraction": clip_fraction,
           "logratio_max": ((logprobs.detach() - old_logprobs).abs() * mask).max()}
    actor_opt.zero_grad(set_to_none=True)
    loss_total = loss_actor
    # PTX joins the RL loss in the same actor update, as upstream without the 1/2
    # (safe_rlhf/trainers/rl_trainer.py@82743cc:L316-320; docs/reference.md, "PTX loss")
    if ptx_examples is not None:
        g = torch.Generator().manual_seed(args.seed * 7919 + step * d.world_size + d.rank)
        picks = torch.randint(len(ptx_examples), (seq.shape[0],), generator=g).tolist()
        ids, am_ptx, labels = (t.to(d.device) for t in M.collate_right([ptx_examples[i] for i in picks],
                                                                        tokenizer.pad_token_id))
        with M.autocast(d):
            out["ptx"] = ptx_loss(M.policy_logprobs(actor, ids, am_ptx, right_padded=True), labels)
        loss_total = loss_actor + args.ptx_coeff * out["ptx"]
    loss_total.backward()
    plumbing.clip_grad_norm(actor, args.max_grad_norm)
    actor_opt.step()
    actor_sched.step()
    return out


def log_step(args: PolicyArgs, record: dict, bar, meter, logger, samples_log, tokenizer, step: int,
             prompts: list[str], sequences: torch.Tensor, S: int, reward: torch.Tensor, cost: torch.Tensor) -> None:
    """The progress bar, a log line every --log_every rl_steps (with throughput and ETA), the metrics
    record, and every --sample_every rl_steps the micro-batch's first four answers."""
    bar.set_postfix(R=f"{record['objective/reward']:.2f}", C=f"{record['objective/cost']:.2f}",
                    lam=f"{record['lagrangian/lambda']:.2f}", kl=f"{record['objective/kl']:.2f}")
    if step % args.log_every == 0 or step == args.total_steps:
        record.update(meter.rates(step))
        M.print0(step_line(record))
    logger.log(record)
    if args.sample_every and step % args.sample_every == 0:
        texts = tokenizer.batch_decode(sequences[:4, S:], skip_special_tokens=True)
        for p, r, rw, c in zip(prompts[:4], texts, reward.tolist(), cost.tolist()):
            samples_log.log({"step": step, "prompt": p, "response": r, "reward": rw, "cost": c})
            M.print0(f"  [{rw:+.2f} R | {c:+.2f} C] {p} -> {r[:100]}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(args: Args) -> None:
    # ---- distributed set-up (model.py), checks ---------------------------------------------
    d = M.init_distributed(args.device)
    derivation = check_args(args, d)
    bf16 = d.device.type == "cuda"
    # Claim the folder before reading anything: locked for this run, never another run's without
    # --overwrite, and with --resume the saved arguments must match (fails before anything is written).
    lock, state = plumbing.open_run_folder(args, d.world_size, d.is_main, "ppo_lagrangian")  # noqa: F841 - held

    # ---- tokenizer and data (validated before anything is written) -------------------------
    tokenizer, prompts, ptx_examples, data_summary, rollouts_per_epoch, total_rollouts = load_data(args, d)

    # ---- models: actor, reference, reward, cost, two critics -------------------------------
    # Only rank 0 reads the checkpoints; the other ranks build meta skeletons and receive the
    # weights when prepare_model shards them (one CPU copy per node instead of one per rank).
    load = dict(dtype=torch.float32, trust_remote_code=args.trust_remote_code, meta=d.enabled and not d.is_main)
    actor, reference, reward_model, cost_model = load_models(args, d, tokenizer, **load)
    out = Path(args.output_dir)
    reward_critic = M.load_score_model(str(out / "reward_critic") if args.resume else
                                       args.reward_critic_model_name_or_path or args.reward_model_name_or_path,
                                       tokenizer, "critic", stage_hint=HINT["reward"], accept=("policy", "reward", "critic"),
                                       flag="--reward_critic_model_name_or_path", **load)
    cost_critic = M.load_score_model(str(out / "cost_critic") if args.resume else
                                     args.cost_critic_model_name_or_path or args.cost_model_name_or_path,
                                     tokenizer, "critic", stage_hint=HINT["cost"], accept=("policy", "cost", "critic"),
                                     flag="--cost_critic_model_name_or_path", **load)
    prep = dict(bf16=bf16, activation_checkpointing=args.gradient_checkpointing)
    actor = M.prepare_model(actor, d, trainable=True, **prep)
    reward_critic = M.prepare_model(reward_critic, d, trainable=True, **prep)
    cost_critic = M.prepare_model(cost_critic, d, trainable=True, **prep)
    reference = M.prepare_model(reference, d, trainable=False, bf16=bf16)
    reward_model = M.prepare_model(reward_model, d, trainable=False, bf16=bf16)
    cost_model = M.prepare_model(cost_model, d, trainable=False, bf16=bf16)
    M.print0(f"actor {plumbing.count_parameters(actor) * d.world_size / 1e6:.2f}M parameters (x6 models) | "
             f"{len(prompts)} unique prompts | {args.total_steps} rl_steps | world size {d.world_size}")

    # ---- optimisers: one per trained model, plus SGD on log(lambda) ------------------------
    warmup = int(args.actor_warmup_ratio * args.total_steps)
    adam = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    actor_opt = plumbing.make_optimizer(actor, args.actor_lr, args.actor_weight_decay, **adam)
    actor_sched = plumbing.make_scheduler(actor_opt, args.actor_lr_scheduler, warmup, args.total_steps)
    trained = {"actor": (actor, actor_opt, actor_sched)}
    for name, critic in (("reward_critic", reward_critic), ("cost_critic", cost_critic)):
        opt = plumbing.make_optimizer(critic, args.critic_lr, args.critic_weight_decay, **adam)
        trained[name] = (critic, opt, plumbing.make_scheduler(opt, args.critic_lr_scheduler, warmup, args.total_steps))
    log_lambda, lambda_opt, episode_costs = make_lambda(args, d)

    step, position = start_run(args, d, state, trained, log_lambda, episode_costs)
    logger, samples_log = open_logs(args, d, step, data_summary)
    M.print0(plumbing.recipe_line(args))
    M.print0(derivation or f"threshold {args.threshold:+.3f} (--threshold)")

    # ---- the loop -------------------------------------------------------------------------
    bar = plumbing.progress(total=args.total_steps, initial=step, enabled=d.is_main, desc="ppo-lag")
    meter = plumbing.Throughput(step, args.total_steps)
    for epoch, batch_prompts in rollout_batches(args, d, prompts, position, rollouts_per_epoch, total_rollouts):
        timer = {"generation": 0.0, "scoring": 0.0, "training": 0.0}

        # ======== 1. rollout (no grad, eval mode) ========================================
        t0 = time.perf_counter()
        actor.eval(), reward_critic.eval(), cost_critic.eval()   # rollout and scoring: no dropout anywhere
        sequences, attention_mask, S = generate(args, d, tokenizer, actor, batch_prompts)   # (B, L)
        timer["generation"] = time.perf_counter() - t0

        # ======== 2. score and record the old policy (no grad) ===========================
        t0 = time.perf_counter()
        # 2a-2d: EOS, reward and cost, missing-EOS penalty, old and reference log-probs (score())
        rollout = score(args, d, tokenizer, sequences, attention_mask, S, actor, reference, reward_model, cost_model)
        reward, cost, old_logprobs, mask = rollout["reward"], rollout["cost"], rollout["old_logprobs"], rollout["mask"]
        # 2e. critics' values: V_t is read at the token that precedes action t (one-token shift)
        start = S - 1                                        # logp[:, start] is the first generated token
        with torch.no_grad(), M.autocast(d):
            reward_values = reward_critic(sequences, attention_mask).scores[:, :-1][:, start:]   # (B, T)
            cost_values = cost_critic(sequences, attention_mask).scores[:, :-1][:, start:]       # (B, T)
        # 2f. the episode-cost window holds the cost-model scores (no KL, no clip; plus the missing-EOS
        #     penalty of 2c where --missing_eos_penalty is set) (safe_rlhf/algorithms/ppo_lag/trainer.py@82743cc:L197)
        episode_costs.extend(cost.tolist())
        timer["scoring"] = time.perf_counter() - t0

        # ======== 3. per-token rewards/costs, advantages and returns =====================
        score_ = shaped_score(reward, cost, args.lambda_init) if args.reward_shaping else reward  # (B,)
        rewards, costs = per_token_rewards_and_costs(score_, cost, old_logprobs, rollout["ref_logprobs"], mask,
                                                     args.kl_coeff, args.clip_range_score)  # (B, T)
        reward_advantages, reward_returns = gae(reward_values, rewards, mask, args.gamma, args.gae_lambda)
        cost_advantages, cost_returns = gae(cost_values, costs, mask, args.gamma, args.gae_lambda)
        rollout.update(rewards=rewards, costs=costs, reward_advantages=reward_advantages,
                       cost_advantages=cost_advantages)   # for the diagnostics

        # ======== 4. PPO updates: epochs x micro-batches of rl_steps =====================
        t0 = time.perf_counter()
        actor.train(), reward_critic.train(), cost_critic.train()
        B, mb = sequences.shape[0], args.per_device_train_batch_size
        for update_iter in range(args.update_iters):
            for lo in range(0, B, mb):
                sl = slice(lo, lo + mb)
                # -- 4a. the dual step first (eq. 12): the same lambda on every rank ---------
                lagrange_multiplier, episode_cost = dual_step(args, d, log_lambda, lambda_opt, episode_costs, step)
                # -- 4b. actor (+ PTX) ----------------------------------------------------------
                advantages = (reward_advantages[sl] if args.reward_shaping else  # shaping: one stream, plain PPO
                              combined_advantage(reward_advantages[sl], cost_advantages[sl], lagrange_multiplier))
                losses = actor_step(args, d, tokenizer, actor, actor_opt, actor_sched, sequences[sl],
                                    attention_mask[sl], start, old_logprobs[sl], advantages, mask[sl],
                                    ptx_examples, step)
                # -- 4c. reward critic, then cost critic --------------------------------------
                for name, old_values, returns in (("reward_critic", reward_values, reward_returns),
                                                  ("cost_critic", cost_values, cost_returns)):
                    critic, critic_opt, critic_sched = trained[name]
                    with M.autocast(d):
                        values = critic(sequences[sl], attention_mask[sl]).scores[:, :-1][:, start:]   # (b, T)
                    loss = critic_loss(values, old_values[sl], returns[sl], mask[sl], args.clip_range_value)
                    plumbing.check_finite(loss, f"{name} loss", step)
                    critic_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    plumbing.clip_grad_norm(critic, args.max_grad_norm)
                    critic_opt.step()
                    critic_sched.step()
                    losses[name] = loss.detach()
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
                               "lr/critic": trained["reward_critic"][2].get_last_lr()[0],
                               "memory/peak_gib": plumbing.peak_memory_gib(d.device),
                               **{f"time/{k}": v for k, v in timer.items()}})
                log_step(args, record, bar, meter, logger, samples_log, tokenizer, step, batch_prompts[lo:lo + 4],
                         sequences[sl], S, reward[sl], cost[sl])
        # stop only at a rollout boundary, so a resumed run continues with the next rollout
        stop = args.stop_at_step is not None and step >= args.stop_at_step
        if args.save and not stop and checkpoint_due(args, step):
            save_run(args, d, tokenizer, trained, log_lambda, episode_costs, {**position, "step": step},
                     "ppo_lagrangian")
        if stop:
            break
    bar.close()
    M.print0(f"trained: {meter.summary(step)}")

    # ---- saving, then tearing down ----------------------------------------------------------
    if args.save:
        save_run(args, d, tokenizer, trained, log_lambda, episode_costs, {**position, "step": step}, "ppo_lagrangian")
        M.print0(f"saved the actor to {out} (critics in {out}/reward_critic, {out}/cost_critic)")
    M.teardown_distributed()


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.splitlines()[0])))
