"""tools/audit_adapter.py: this project's functions, case by case, for `python -m tools.audit`.

A template for your own: copy this file, replace each function's body with calls into your code, drop
the groups you have no counterpart for (they are listed as "no counterpart"), empty DEVIATIONS, then
    python -m tools.audit --adapter my_adapter.py
Each function is named after a vector group (the cases' `function`, "/" -> "__"), takes the case's
inputs (tensors: float64, float32 where the official arithmetic was, bool masks, int64 ids) and
hyper-parameters, and returns the outputs it computes under the official names and shapes. Shapes:
B batch, S padded prompt width, L sequence width, T = L - S response columns, V vocabulary.

This adapter calls the project's functions as they are and never adjusts a result. Where the project
works on different columns or names than the official code, the adapter only translates: RL arrays
are cut to the response columns [:, start:] as the loop does (start = S - 1), the streams are put
back at those columns of a (B, L - 1) array, the official safety sign s (+1 safe) becomes the
project's cost sign -s, and the project's metric names are mapped to the official log's (INFO_NAMES).
A whole rl_step is the loop of ppo_lagrangian.main composed from its math in the loop's order:
lambda step (ppo_lagrangian.dual_step, called as is), KL-shaped streams, GAE on each stream (no
whitening), combined advantage, actor loss, then the reward and cost critics' losses, and the step's
record (step_record). The rollout mask is model.sample's rule (model.rollout_mask_step) run over the case's
generated columns. No counterpart here: the token-wise reward and cost losses (the project trains
sequence-wise only).
"""

from __future__ import annotations

import collections
import math
from types import SimpleNamespace

import torch

import cost
import data_rules
import model as M
import ppo_lagrangian as P
import reward

from policy_run import step_record

# --------------------------------------------------------------------------------------------
# Documented deviations: case (or "case:output") -> (why the project differs, the largest |diff| allowed)
# --------------------------------------------------------------------------------------------

FLOAT32_LOG_SOFTMAX = "log_softmax in float32 (model.sequence_logprobs); official: in the logits' dtype, float64 here"
PAD_ENDS_THE_ROW = "a sampled PAD ends the row (model.rollout_mask_step); official: a hole, the tokens after it real"
DEVIATIONS = {   # case, or "case:output" -> (why the project differs, the largest |diff| allowed)
    "gather_log_probabilities#b1_single_token":                                 (FLOAT32_LOG_SOFTMAX, 1e-06),
    "gather_log_probabilities#b2_hole":                                         (FLOAT32_LOG_SOFTMAX, 1e-06),
    "gather_log_probabilities#b3_ragged":                                       (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/ppo_lag#b1_single_token":                                          (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/ppo_lag#b2_hole":                                                  (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/ppo_lag#b3_ragged":                                                (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/ppo_lag#b3_ragged_stress":                                         (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/ppo#b1_single_token":                                              (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/ppo#b3_ragged":                                                    (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/reward_shaping#b2_hole_nu1":                                       (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rl_step/reward_shaping#b3_ragged_nu10_clip":                               (FLOAT32_LOG_SOFTMAX, 1e-06),
    "rollout/attention_mask#b3":                                                (PAD_ENDS_THE_ROW, 1.0),
}

# The official rl_step's log (train/*) -> the project's metric of the same quantity (docs/metrics.md).
# Not logged by the project: train/*_return, train/*_value, train/max_generated_length, train/shaped_reward.
INFO_NAMES = {
    "train/actor_loss": "loss/actor", "train/reward_critic_loss": "loss/reward_critic",
    "train/cost_critic_loss": "loss/cost_critic", "train/lambda": "lagrangian/lambda",
    "train/episode_cost": "lagrangian/episode_cost", "train/reward": "objective/reward", "train/cost": "objective/cost",
    "train/kl_divergence": "objective/kl", "train/mean_generated_length": "policy/response_length",
    "train/reward_with_kl_penalty": "objective/reward_with_kl_penalty",
    "train/cost_with_kl_penalty": "objective/cost_with_kl_penalty",
    "train/reward_advantage": "policy/reward_advantage_mean", "train/cost_advantage": "policy/cost_advantage_mean",
}
SHAPING_INFO_NAMES = {   # reward shaping: the project's reward stream carries R - nu*C
    "train/actor_loss": "loss/actor", "train/reward_critic_loss": "loss/reward_critic",
    "train/episode_cost": "lagrangian/episode_cost", "train/reward": "objective/reward", "train/cost": "objective/cost",
    "train/kl_divergence": "objective/kl", "train/mean_generated_length": "policy/response_length",
    "train/shaped_reward_with_kl_penalty": "objective/reward_with_kl_penalty",
    "train/shaped_reward_advantage": "policy/reward_advantage_mean",
}


# --------------------------------------------------------------------------------------------
# model.py: masked mean, log-probs with the one-token shift, end scores; the prompt template
# --------------------------------------------------------------------------------------------


def masked_mean(inputs, hp):
    # the official masked_mean is per-sequence then batch: M.masked_sequence_mean (M.masked_mean pools tokens)
    return {"mean": M.masked_sequence_mean(inputs["x"], inputs["mask"])}


def gather_log_probabilities(inputs, hp):
    return {"log_probs": M.sequence_logprobs(inputs["logits"], inputs["input_ids"])}   # (B, L-1), shift inside


class GivenHiddenStates(torch.nn.Module):
    """A backbone stand-in that returns the case's last hidden states (as the official harness's engines do)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = torch.nn.Parameter(hidden, requires_grad=False)                     # (B, L, E)
        self.config = SimpleNamespace(hidden_size=hidden.shape[-1], initializer_range=0.02)

    def forward(self, **kwargs):
        return SimpleNamespace(last_hidden_state=self.hidden)


def end_scores(inputs, hp, right_padded=False):
    score_model = M.ScoreModel(GivenHiddenStates(inputs["last_hidden_state"]), "reward")
    with torch.no_grad():
        score_model.score_head.weight.copy_(inputs["score_head_weight"])                  # (1, E)
        score_model.score_head.bias.copy_(inputs["score_head_bias"])                      # (1,)
        out = score_model(inputs["input_ids"], inputs["attention_mask"], right_padded=right_padded)
    # end_last_hidden_state: the project does not return it
    return {"scores": out.scores[..., None], "end_scores": out.end_scores[:, None], "end_index": out.end_index}


def end_scores__right_padded(inputs, hp):   # reward/cost training batches (collate_pairs)
    return end_scores(inputs, hp, right_padded=True)


end_scores__left_padded = end_scores__rl_sequences = end_scores


def rollout__attention_mask(inputs, hp):
    """model.sample builds the mask while sampling, column by column (model.rollout_mask_step); here over the
    case's generated columns. The prompt's mask is left_pad's (real tokens, here the ids that are not PAD)."""
    prompt, sequences = inputs["prompt_input_ids"], inputs["sequences"]                  # (B, S), (B, L)
    finished, columns = torch.zeros(len(sequences), dtype=torch.bool), [prompt != hp["pad_token_id"]]
    for token in sequences[:, prompt.shape[1]:].T:                                       # (B,) per generated column
        real, _, finished = M.rollout_mask_step(token, finished, hp["eos_token_id"], hp["pad_token_id"],
                                                hp["unk_token_id"])
        columns.append(real[:, None])
    return {"attention_mask": torch.cat(columns, dim=1)}                                 # (B, L) bool


def data__prompt_template(inputs, hp):
    return {"prompts": [M.format_prompt(request) for request in inputs["requests"]]}


# --------------------------------------------------------------------------------------------
# reward.py, cost.py: eq. 5, eq. 6, their metrics and the pairs read from the data
# --------------------------------------------------------------------------------------------


def reward_loss__eq5(inputs, hp):
    better, worse = inputs["better_end_scores"], inputs["worse_end_scores"]                  # (B,)
    return {"loss": reward.reward_loss(better, worse, hp["regularization"]),
            "accuracy": reward.reward_metrics(better, worse, None)["accuracy"]}


def cost_loss__eq6(inputs, hp):
    safer, unsafer = inputs["safer_end_costs"], inputs["unsafer_end_costs"]                  # (B,)
    safer_sign = -inputs["safer_safety_sign"]       # cost sign = -safety sign: +1 unsafe, -1 safe
    unsafer_sign = -inputs["unsafer_safety_sign"]
    metrics = cost.cost_metrics(safer, unsafer, torch.stack([safer_sign, unsafer_sign], dim=1))
    return {"loss": cost.cost_loss(safer, unsafer, safer_sign, unsafer_sign, hp["regularization"]),
            "accuracy": metrics["accuracy"], "accuracy_sign": metrics["accuracy_sign"]}


class CharTokenizer:
    """The official harness's stand-in tokenizer: one id per character, no BOS, so ids decode to the text."""

    def __init__(self, eos_token: str):
        self.eos_token = eos_token

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def texts(hp, prompt: str, responses: tuple[str, str]) -> list[str]:
    """The training texts the project builds (M.tokenize_prompt_response: template + response + EOS)."""
    examples, _ = M.tokenize_prompt_response(CharTokenizer(hp["eos_token"]), [prompt] * 2, list(responses), 10**6)
    return ["".join(map(chr, e["input_ids"])) for e in examples]


def data__reward_pairs(inputs, hp):
    pairs = [texts(hp, row["prompt"], reward.better_worse(row, f"row {i}")[:2]) for i, row in enumerate(inputs["rows"])]
    return {"better_text": [b for b, _ in pairs], "worse_text": [w for _, w in pairs]}


def data__cost_pairs_and_signs(inputs, hp):
    out = {k: [] for k in ("safer_text", "unsafer_text", "safer_safety_sign", "unsafer_safety_sign")}
    for i, row in enumerate(inputs["rows"]):
        try:
            safer, unsafer, signs = cost.safer_unsafer(row, f"row {i}")
            values = texts(hp, row["prompt"], (safer, unsafer)) + [int(-signs[0]), int(-signs[1])]  # safety sign
        except data_rules.Unusable:   # the project drops the row (the official loader raises ValueError)
            values = [None] * 4
        for key, value in zip(out, values):
            out[key].append(value)
    return out   # `rejected` (the official exception text): the project drops and counts the row instead


# --------------------------------------------------------------------------------------------
# ppo_lagrangian.py: streams, GAE, losses, the lambda step
# --------------------------------------------------------------------------------------------


def full_width(response_columns: torch.Tensor, start: int) -> torch.Tensor:
    """(B, T) response columns -> (B, L-1) with zeros before start (columns the checker does not read)."""
    B, T = response_columns.shape
    return torch.cat([response_columns.new_zeros(B, start), response_columns], dim=1)


def streams(inputs, hp, score, cost_score):
    """The loop's step 3: KL-shaped reward and cost streams on the response columns."""
    start = inputs["prompt"].shape[1] - 1
    mask = inputs["sequence_mask"][:, start:].float()                                     # (B, T)
    rewards, costs = P.per_token_rewards_and_costs(score, cost_score, inputs["log_probs"][:, start:],
                                                   inputs["ref_log_probs"][:, start:], mask, hp["kl_coeff"],
                                                   hp["clip_range_score"])                # (B, T)
    return start, mask, rewards, costs


def kl_reward_and_cost_streams(inputs, hp):
    start, mask, rewards, costs = streams(inputs, hp, inputs["reward"], inputs["cost"])
    return {"rewards": full_width(rewards, start), "costs": full_width(costs, start),
            "end_index": P.end_indices(mask) + start}


def kl_reward_stream__ppo(inputs, hp):   # plain PPO: the reward stream alone (no cost model here)
    start, _, rewards, _ = streams(inputs, hp, inputs["reward"], torch.zeros_like(inputs["reward"]))
    return {"rewards": full_width(rewards, start)}


def gae__reward(inputs, hp):
    start, mask = inputs["start"], inputs["sequence_mask"][:, inputs["start"]:].float()   # (B, T)
    advantages, returns = P.gae(inputs["values"][:, start:], inputs["rewards"][:, start:], mask, hp["gamma"],
                                hp["gae_lambda"])
    return {"advantages": advantages, "returns": returns}


gae__cost = gae__gamma_lambda = gae__reward


def actor_loss__ppo(inputs, hp, advantages=None):
    log_probs = inputs["log_probs"].clone().requires_grad_()                                # (B, T)
    advantages = inputs["advantages"] if advantages is None else advantages
    loss, _ = P.actor_loss(log_probs, inputs["old_log_probs"], advantages, inputs["mask"].float(),
                           hp["clip_range_ratio"])
    loss.backward()
    return {"loss": loss, "grad_log_probs": log_probs.grad}


def actor_loss__ppo_lag(inputs, hp):
    lagrange_multiplier = torch.tensor(hp["log_lambda"]).exp().item()    # a constant, as dual_step returns it
    advantages = P.combined_advantage(inputs["reward_advantages"], inputs["cost_advantages"], lagrange_multiplier)
    return actor_loss__ppo(inputs, hp, advantages)


def critic_loss(inputs, hp):
    values = inputs["values"].clone().requires_grad_()                                      # (B, T)
    loss = P.critic_loss(values, inputs["old_values"], inputs["returns"], inputs["mask"].float(), hp["clip_range_value"])
    loss.backward()
    return {"loss": loss, "grad_values": values.grad}


def lambda_state(log_lambda: float, hp: dict, episode_costs=()) -> SimpleNamespace:
    """What the loop holds for the dual step: log(lambda) as a parameter, SGD on it, the episode-cost window."""
    log_lambda = torch.nn.Parameter(torch.tensor(log_lambda))
    window = collections.deque(episode_costs, maxlen=hp.get("episode_cost_window_size", 128))
    args = SimpleNamespace(lambda_lr=hp.get("lambda_lr", 0.0), lambda_max=hp.get("lambda_max"),
                           threshold=hp.get("threshold", 0.0),
                           lambda_update_delay_steps=hp.get("lambda_update_delay_steps", 0),
                           reward_shaping=hp.get("reward_shaping", False))
    return SimpleNamespace(args=args, d=M.Dist(0, 0, 1, torch.device("cpu")), log_lambda=log_lambda,
                           lambda_opt=torch.optim.SGD([log_lambda], lr=args.lambda_lr), episode_costs=window, step=0)


def dual_step(run: SimpleNamespace, step: int) -> tuple[float, float]:
    """ppo_lagrangian.dual_step as it is, at rl_step `step`. Returns (lambda, episode cost)."""
    run.step = step
    return P.dual_step(run)


def lambda_update__steps(inputs, hp):
    lambda_init = hp["lambda_init"]   # as the loop's make_lambda: log(lambda_init), -inf for 0
    run = lambda_state(math.log(lambda_init) if lambda_init > 0 else -math.inf, hp)
    out = {"episode_cost": [], "lambda": [], "log_lambda": []}
    costs_per_step = inputs["episode_costs_per_step"]   # (steps, costs added per step): a tensor, or lists if ragged
    costs_per_step = costs_per_step.tolist() if torch.is_tensor(costs_per_step) else costs_per_step
    for costs, step in zip(costs_per_step, inputs["global_steps"].tolist()):
        run.episode_costs.extend(costs)                  # the loop's step 2f
        lagrange_multiplier, episode_cost = dual_step(run, step)
        out["episode_cost"].append(episode_cost)
        out["lambda"].append(lagrange_multiplier)
        out["log_lambda"].append(run.log_lambda.item())
    return out


# --------------------------------------------------------------------------------------------
# Whole rl_steps, composed as ppo_lagrangian.main's loop runs them (one micro-batch, one epoch)
# --------------------------------------------------------------------------------------------


def rl_step(inputs, hp, kind: str) -> dict:
    """kind: ppo_lag; ppo (the project's plain PPO: --lambda_init 0 --lambda_lr 0, no cost model here:
    C = 0 and its values 0, so the combined advantage is A_R); reward_shaping (--reward_shaping
    --lambda_init nu --lambda_lr 0: one stream on R - nu*C, its advantage alone)."""
    B = inputs["input_ids"].shape[0]
    zeros = torch.zeros(B)
    cost_score = inputs.get("cost", zeros)
    # 4a. the dual step (in the loop it comes after 3; they are independent)
    if kind == "ppo_lag":
        run = lambda_state(inputs["log_lambda"], hp, inputs["episode_costs"].tolist())
    else:
        run = lambda_state(-math.inf if kind == "ppo" else math.log(hp["lambda_init"]),
                           {**hp, "lambda_lr": 0.0, "reward_shaping": kind == "reward_shaping"},
                           inputs["episode_costs"].tolist() if "episode_costs" in inputs else [0.0])
    lagrange_multiplier, episode_cost = dual_step(run, inputs.get("global_step", 0))
    # 3. per-token rewards and costs, advantages and returns (response columns)
    score = P.shaped_score(inputs["reward"], cost_score, hp["lambda_init"]) if kind == "reward_shaping" else inputs["reward"]
    start, mask, rewards, costs = streams({**inputs, "sequence_mask": inputs["attention_mask"][:, 1:]}, hp,
                                          score, cost_score)
    old_logprobs = inputs["log_probs"][:, start:]                                           # (B, T)
    reward_values = inputs["shaped_reward_values" if kind == "reward_shaping" else "reward_values"][:, start:]
    cost_values = inputs["cost_values"][:, start:] if kind == "ppo_lag" else torch.zeros_like(reward_values)
    reward_advantages, reward_returns = P.gae(reward_values, rewards, mask, hp["gamma"], hp["gae_lambda"])
    cost_advantages, cost_returns = P.gae(cost_values, costs, mask, hp["gamma"], hp["gae_lambda"])
    # 4b. actor: the combined advantage (shaping: the one stream's), the clipped surrogate
    advantages = (reward_advantages if kind == "reward_shaping" else
                  P.combined_advantage(reward_advantages, cost_advantages, lagrange_multiplier))
    logits = inputs["actor_logits"].clone().requires_grad_()                                # (B, L, V)
    logprobs = M.sequence_logprobs(logits, inputs["input_ids"])[:, start:]                  # (B, T)
    loss_actor, clip_fraction = P.actor_loss(logprobs, old_logprobs, advantages, mask, hp["clip_range_ratio"])
    loss_actor.backward()
    losses = {"actor": loss_actor.detach(), "clip_fraction": clip_fraction,
              "logratio_max": ((logprobs.detach() - old_logprobs).abs() * mask).max()}
    # 4c. reward critic, then cost critic, on the critics' scores[:, :-1][:, start:]
    out = {}
    critics = [("reward", reward_values, reward_returns)] + ([("cost", cost_values, cost_returns)] * (kind == "ppo_lag"))
    for name, old_values, returns in critics:
        scores = inputs[f"{name}_critic_scores"].clone().requires_grad_()                   # (B, L, 1)
        loss = P.critic_loss(scores.squeeze(-1)[:, :-1][:, start:], old_values, returns, mask, hp["clip_range_value"])
        loss.backward()
        losses[f"{name}_critic"] = loss.detach()
        out.update({f"{name}_critic_loss": loss, f"grad_{name}_critic_scores": scores.grad})
    # 5. the step's record, under the official log's names
    micro = dict(reward=inputs["reward"], cost=cost_score, has_eos=torch.ones(B, dtype=torch.bool),
                 old_logprobs=old_logprobs, ref_logprobs=inputs["ref_log_probs"][:, start:], rewards=rewards,
                 costs=costs, reward_advantages=reward_advantages, cost_advantages=cost_advantages, mask=mask)
    record = step_record(1, 0, micro, losses, True, lagrange_multiplier, episode_cost, run.args.threshold)
    names = SHAPING_INFO_NAMES if kind == "reward_shaping" else INFO_NAMES
    out.update(actor_loss=loss_actor, grad_actor_logits=logits.grad, rewards=full_width(rewards, start),
               info={official: record[ours] for official, ours in names.items() if ours in record})
    if kind == "ppo_lag":
        out.update(costs=full_width(costs, start), reward_advantages=reward_advantages, reward_returns=reward_returns,
                   cost_advantages=cost_advantages, cost_returns=cost_returns, episode_cost=episode_cost,
                   log_lambda=run.log_lambda.item(), **{"lambda": lagrange_multiplier})
    else:
        out.update(advantages=reward_advantages, returns=reward_returns)
    return out


def rl_step__ppo_lag(inputs, hp):
    return rl_step(inputs, hp, "ppo_lag")


def rl_step__ppo(inputs, hp):
    return rl_step(inputs, hp, "ppo")


def rl_step__reward_shaping(inputs, hp):
    return rl_step(inputs, hp, "reward_shaping")
