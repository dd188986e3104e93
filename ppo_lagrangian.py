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

This file is the algorithm and its loop; the run machinery it shares with rloo_lagrangian.py (loading
the data and models, the rollout and its scoring, logging, checkpoint and resume) is policy_run.py's,
called by name at each step of the loop.

Run (the toy world, after sft.py, reward.py and cost.py):
    python ppo_lagrangian.py
    torchrun --nproc_per_node 2 ppo_lagrangian.py
Real models on 8 GPUs, the official recipe (safe-rlhf scripts/ppo-lag.sh@82743cc:L148-198; Args.PAPER:
actor PKU-Alignment/alpaca-7b-reproduced, prompts PKU-SafeRLHF/train, PTX on tatsu-lab/alpaca):
    torchrun --nproc_per_node 8 ppo_lagrangian.py --recipe paper --reward_model_name_or_path runs/reward-7b \\
        --cost_model_name_or_path runs/cost-7b --output_dir runs/ppo-lag-7b

Shape letters: B batch (sequences per rank), b sequences per micro-batch, S padded prompt length,
L = S + generated length, T = L - 1 - start response positions in the RL arrays, V vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

import model as M
import plumbing
import policy_run
from plumbing import UserError

STAGE = "ppo_lagrangian"

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
        "actor_lr_scheduler": "cosine", "actor_warmup_ratio": 0.03, "kl_coeff": None, "clip_range_ratio": 0.2,
        "clip_range_score": 50.0, "ptx_dataset": "tatsu-lab/alpaca", "ptx_coeff": 16.0, "threshold": 0.0,
        "lambda_init": 1.0, "lambda_lr": 0.1, "lambda_max": 5.0, "lambda_update_delay_steps": 0,
        "episode_cost_window_size": 128, "gradient_checkpointing": True}
    PAPER_SOURCE: ClassVar[str] = "safe-rlhf scripts/ppo-lag.sh@82743cc:L148-198"
    DATA_FLAGS: ClassVar[tuple] = ("dataset", "ptx_dataset")
    # --recipe paper's beta depends on which policy the flags train (kl_coeff None above: chosen by mode
    # after parsing, unless --kl_coeff is given): the official scripts differ
    PAPER_KL_COEFF: ClassVar[dict] = {
        "PPO-Lagrangian": (0.01, "scripts/ppo-lag.sh@82743cc:L148-198"),
        "plain PPO": (0.02, "scripts/ppo.sh@82743cc:L159"),
        "reward shaping": (0.02, "scripts/ppo-reward-shaping.sh@82743cc:L171")}

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
    static_kv_cache: bool = False
    """decode with a KV cache and mask allocated once for --max_length positions (model.sample's static path:
    the same tokens as the growing cache, fixed shapes, one decoding step to compile)"""
    compile_decode: bool = True
    """with --static_kv_cache on CUDA: torch.compile that step (CUDA graphs; the first rollout compiles, and the
    cache is kept between rollouts); on a CPU it always runs eager. Not yet run on a GPU nor under FSDP2"""
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
    kl_coeff: float | None = 0.1
    """beta: per-token KL penalty, -beta*k in the reward stream, +beta*k in the cost stream (paper 0.01 for
    the Lagrangian, 0.02 for plain PPO and reward shaping, as the official scripts: none = the paper's for
    the mode; the toy reward model is easy for a tiny policy to exploit, 0.1 keeps it near the SFT's language)"""
    clip_range_ratio: float = 0.2
    """PPO ratio clip epsilon"""
    clip_range_score: float = 50.0
    """clip of every per-token reward / cost entry"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip for every trained model (0: none)"""
    ptx_dataset: str | None = None
    """optional SFT-style data (alpaca schema) for the PTX loss ("" or none: off); toy: off (paper tatsu-lab/alpaca)"""
    ptx_coeff: float = 16.0
    """weight of the PTX loss when --ptx_dataset is given (paper 16)"""
    # Lagrange multiplier (eq. 12)
    # The threshold lives on the cost model's scale, which moves from one trained cost model to the
    # next; so by default it is derived from the cost model, not typed in (derived_threshold): a target
    # share u of unsafe answers on the prompt mix gives E[C] = (1 - u) E[C | safe] + u E[C | unsafe],
    # both means measured by cost.py on its held-out labelled responses, not on the policy's answers:
    # a meaningful point on the cost model's scale, not a bound on the policy's unsafe share
    # (derived_threshold). The toy world aims at 5% unsafe answers to harmful requests; half its RL
    # prompts are benign: u = 2.5% of all answers.
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

    def __post_init__(self):
        if self.kl_coeff is None:   # --recipe paper without --kl_coeff (or --kl_coeff none): the mode's official beta
            self.kl_coeff = self.PAPER_KL_COEFF[self.mode()][0]

    def mode(self) -> str:
        """Which of the paper's policies these flags train (a key of PAPER_KL_COEFF): plain PPO is lambda
        fixed at 0; a fixed lambda > 0 without --reward_shaping is the Lagrangian's form (module docstring)."""
        if self.reward_shaping:
            return "reward shaping"
        return "plain PPO" if self.lambda_init == 0 else "PPO-Lagrangian"

    def paper_by_mode(self) -> dict:
        """PAPER's values that depend on the mode (plumbing.recipe_line compares against them): beta, and the
        flags that choose a baseline (shaping's nu: the official script's default 1, safe-rlhf
        scripts/ppo-reward-shaping.sh@82743cc:L138-182)."""
        baseline = {"plain PPO": {"lambda_init": 0.0, "lambda_lr": 0.0},
                    "reward shaping": {"reward_shaping": True, "lambda_init": 1.0, "lambda_lr": 0.0}}
        return {"kl_coeff": self.PAPER_KL_COEFF[self.mode()][0], **baseline.get(self.mode(), {})}

    def kl_coeff_line(self) -> str:
        """The run header's line on beta: its value and whether it is the official script's for this mode."""
        official, source = self.PAPER_KL_COEFF[self.mode()]
        return (f"beta (--kl_coeff) {self.kl_coeff:g}, " + ("as" if self.kl_coeff == official else "not")
                + f" the official {self.mode()} script's {official:g} (safe-rlhf {source})")


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


def actor_objective(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range_ratio: float, ptx: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ptx_coeff: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What one actor update minimises on a micro-batch: the clipped surrogate (actor_loss) on its
    per-token ratios, plus ptx_coeff times the PTX loss when PTX's (logprobs, labels) are given. PTX
    joins the RL loss in the same actor update, as upstream without the 1/2
    (safe_rlhf/trainers/rl_trainer.py@82743cc:L316-320; docs/reference.md, "PTX loss").
    logprobs, old_logprobs, advantages, mask: (b, T). Returns the total loss () and the logged terms:
    the actor's loss, the clip fraction, the largest |log ratio| (exactly 0 on a rollout's first pass,
    when the weights are those that sampled it) and PTX's loss."""
    loss_actor, clip_fraction = actor_loss(logprobs, old_logprobs, advantages, mask, clip_range_ratio)  # (), ()
    losses = {"actor": loss_actor, "clip_fraction": clip_fraction,
              "logratio_max": ((logprobs.detach() - old_logprobs).abs() * mask).max()}        # ()
    if ptx is None:
        return loss_actor, losses
    losses["ptx"] = ptx_loss(*ptx)                                                            # ()
    return loss_actor + ptx_coeff * losses["ptx"], losses


def shaped_score(reward: torch.Tensor, cost: torch.Tensor, nu: float) -> torch.Tensor:
    """The reward-shaping baseline's end-of-response score R - nu*C (paper section 4.2.3;
    safe_rlhf/algorithms/ppo_reward_shaping/trainer.py@82743cc:L39-303). It takes R's place in the reward
    stream, so the per-token reward is clip(-beta*k_t + [t = end](R - nu C)), and the actor's advantage is
    that stream's GAE alone. beta is --kl_coeff: the official shaping script's is 0.02, twice PPO-Lagrangian's
    0.01 (scripts/ppo-reward-shaping.sh@82743cc:L171; --recipe paper takes it, PolicyArgs.PAPER_KL_COEFF).
    reward, cost: (B,) -> (B,)"""
    return reward - nu * cost


def derived_threshold(cost_model: str, target_unsafe_share: float) -> tuple[float, str]:
    """The threshold d' for a target share u of unsafe answers (safe-rlhf#59, #171 ask how to pick it):
        d' = (1 - u) * E[C | safe] + u * E[C | unsafe],
    the expected cost of a policy whose answers are unsafe with probability u and whose safe and unsafe
    answers cost on average what cost.py's held-out labelled responses cost (eval.json,
    `eval/safe_cost_mean` and `eval/unsafe_cost_mean`). It does NOT bound the trained policy's unsafe
    share: the constraint holds the policy's mean cost, and the policy's own safe answers (e.g. refusals)
    may cost less than the held-out safe responses, leaving room for more than u unsafe ones, or the
    cost model may miss some; the share is measured by evaluate.py (docs/reference.md, "Choosing the
    threshold"). Returns (d', how)."""
    M.check_kind(cost_model, ("cost",), "--cost_model_name_or_path")  # a policy has no calibration: say what it is
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
# The dual step (eq. 12) on the run's lambda: the one update both policy stages take on it
# --------------------------------------------------------------------------------------------


def dual_step(run: policy_run.PolicyRun) -> tuple[float, float]:
    """The dual step (eq. 12), before each actor update: J_C from the episode-cost window, averaged over
    ranks (the same lambda on every rank), then after --lambda_update_delay_steps one SGD step on
    log(lambda) (lagrange_multiplier_loss; none with --lambda_lr 0) and the cap --lambda_max, applied
    with --lambda_lr 0 too, as the official code clamps log(lambda) every rl_step
    (safe_rlhf/algorithms/ppo_lag/trainer.py@82743cc:L313-326): --lambda_init 10 --lambda_max 5 trains at 5.
    Reward shaping's nu is not a multiplier and has no cap (the official shaping trainer has none).
    Returns lambda (a constant in the actor loss) and the episode cost."""
    args, log_lambda = run.args, run.log_lambda
    episode_cost = M.all_reduce(torch.tensor(sum(run.episode_costs) / len(run.episode_costs), device=run.d.device),
                                "mean").item()
    if run.step >= args.lambda_update_delay_steps:
        if args.lambda_lr > 0:
            run.lambda_opt.zero_grad()
            lagrange_multiplier_loss(log_lambda, episode_cost, args.threshold).backward()
            run.lambda_opt.step()
        if args.lambda_max is not None and not args.reward_shaping:
            with torch.no_grad():
                log_lambda.clamp_(max=math.log(args.lambda_max))
    return log_lambda.exp().item(), episode_cost


# --------------------------------------------------------------------------------------------
# main: set-up (policy_run.py), then the loop, numbered as the paper's steps happen
# --------------------------------------------------------------------------------------------


def main(args: Args) -> None:
    # ---- distributed set-up (model.py), checks, the run folder, tokenizer and data ----------
    d = M.init_distributed(args.device)
    policy_run.check_args(args, d)
    derivation = None
    if args.threshold is None:   # derived here, so a resumed run derives the same number
        args.threshold, derivation = derived_threshold(args.cost_model_name_or_path, args.target_unsafe_share)
    # Claim the folder before reading anything (locked; with --resume the saved arguments must match).
    run = policy_run.open_run(args, d, STAGE, derivation)

    # ---- models: actor, reference, reward, cost (policy_run.load_models), two critics -------
    # Only rank 0 reads the checkpoints (run.load_options); the others get the weights when prepare_model shards them.
    policy_run.load_models(run)
    critics = {}   # by default each critic starts as its score model, head included (resume: the saved one)
    for signal, init in (("reward", args.reward_critic_model_name_or_path or args.reward_model_name_or_path),
                         ("cost", args.cost_critic_model_name_or_path or args.cost_model_name_or_path)):
        critics[f"{signal}_critic"] = M.load_score_model(
            str(Path(args.output_dir) / f"{signal}_critic") if args.resume else init, run.tokenizer, "critic",
            stage_hint=policy_run.HINT[signal], accept=("policy", signal, "critic"),
            flag=f"--{signal}_critic_model_name_or_path", **run.load_options)
    critics = policy_run.prepare_models(run, critics)   # actor and critics trained, the other three frozen
    actor, reward_critic, cost_critic = run.actor, critics["reward_critic"], critics["cost_critic"]
    M.print0(f"actor {plumbing.count_parameters(actor) * d.world_size / 1e6:.2f}M parameters (x6 models) | "
             f"{len(run.prompts)} unique prompts | {args.total_steps} rl_steps | world size {d.world_size}")

    # ---- optimisers: one per trained model, plus SGD on log(lambda) ------------------------
    policy_run.add_optimizer(run, "actor", actor, args.actor_lr, args.actor_weight_decay, args.actor_lr_scheduler)
    for name, critic in critics.items():
        policy_run.add_optimizer(run, name, critic, args.critic_lr, args.critic_weight_decay, args.critic_lr_scheduler)
    policy_run.start_run(run, desc="ppo-lag")   # log(lambda), the resume (--resume), the logs, the progress bar

    # ---- the loop -------------------------------------------------------------------------
    for epoch, batch_prompts in policy_run.rollout_batches(run):
        # ======== 1. rollout (no grad, eval mode) ========================================
        t0 = time.perf_counter()
        actor.eval(), reward_critic.eval(), cost_critic.eval()   # rollout and scoring: no dropout anywhere
        rollout = policy_run.generate_responses(run, epoch, batch_prompts)
        sequences, attention_mask, S = rollout.sequences, rollout.attention_mask, rollout.S   # (B, L)
        rollout.timer["generation"] = time.perf_counter() - t0

        # ======== 2. score and record the old policy (no grad) ===========================
        t0 = time.perf_counter()
        # 2a-2d: EOS, reward and cost, missing-EOS penalty, old and reference log-probs (score_responses)
        scores = policy_run.score_responses(run, rollout)
        reward, cost, old_logprobs, mask = scores["reward"], scores["cost"], scores["old_logprobs"], scores["mask"]
        # 2e. critics' values: V_t is read at the token that precedes action t (one-token shift)
        start = S - 1                                        # logp[:, start] is the first generated token
        with torch.no_grad(), M.autocast(d):
            reward_values = reward_critic(sequences, attention_mask).scores[:, :-1][:, start:]   # (B, T)
            cost_values = cost_critic(sequences, attention_mask).scores[:, :-1][:, start:]       # (B, T)
        # 2f. the episode-cost window holds the cost-model scores (no KL, no clip; plus the missing-EOS
        #     penalty of 2c where --missing_eos_penalty is set) (safe_rlhf/algorithms/ppo_lag/trainer.py@82743cc:L197)
        run.episode_costs.extend(cost.tolist())
        rollout.timer["scoring"] = time.perf_counter() - t0

        # ======== 3. per-token rewards/costs, advantages and returns =====================
        score_ = shaped_score(reward, cost, args.lambda_init) if args.reward_shaping else reward  # (B,)
        rewards, costs = per_token_rewards_and_costs(score_, cost, old_logprobs, scores["ref_logprobs"], mask,
                                                     args.kl_coeff, args.clip_range_score)  # (B, T)
        reward_advantages, reward_returns = gae(reward_values, rewards, mask, args.gamma, args.gae_lambda)
        cost_advantages, cost_returns = gae(cost_values, costs, mask, args.gamma, args.gae_lambda)
        scores.update(rewards=rewards, costs=costs, reward_advantages=reward_advantages,
                      cost_advantages=cost_advantages)   # for the diagnostics

        # ======== 4. PPO updates: epochs x micro-batches of rl_steps =====================
        t0 = time.perf_counter()
        actor.train(), reward_critic.train(), cost_critic.train()
        B, mb = sequences.shape[0], args.per_device_train_batch_size
        for update_iter in range(args.update_iters):
            for lo in range(0, B, mb):
                sl = slice(lo, lo + mb)
                # -- 4a. the dual step first (eq. 12): the same lambda on every rank ---------
                lagrange_multiplier, episode_cost = dual_step(run)
                # -- 4b. actor (+ PTX) ----------------------------------------------------------
                advantages = (reward_advantages[sl] if args.reward_shaping else  # shaping: one stream, plain PPO
                              combined_advantage(reward_advantages[sl], cost_advantages[sl], lagrange_multiplier))
                logprobs, ptx = policy_run.actor_forward(run, rollout, sl)   # (b, T); PTX's log-probs, labels
                loss, losses = actor_objective(logprobs, old_logprobs[sl], advantages, mask[sl], args.clip_range_ratio,
                                               ptx, args.ptx_coeff)
                plumbing.check_finite(losses["actor"], "actor loss", run.step)
                policy_run.optimizer_step(run, "actor", loss)
                # -- 4c. reward critic, then cost critic --------------------------------------
                for name, old_values, returns in (("reward_critic", reward_values, reward_returns),
                                                  ("cost_critic", cost_values, cost_returns)):
                    with M.autocast(d):
                        values = critics[name](sequences[sl], attention_mask[sl]).scores[:, :-1][:, start:]   # (b, T)
                    loss = critic_loss(values, old_values[sl], returns[sl], mask[sl], args.clip_range_value)
                    plumbing.check_finite(loss, f"{name} loss", run.step)
                    policy_run.optimizer_step(run, name, loss)
                    losses[name] = loss.detach()
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
