"""reward.py: the reward model R, paper eq. 5 (Dai et al. 2023, section 3.2 "Preference Model Fitting").

What it optimises. A score model (the SFT policy's decoder + a linear head, model.ScoreModel) reads the
text  BOS "BEGINNING OF CONVERSATION: USER: {x} ASSISTANT:" y EOS  and returns its score at the EOS
(safe_rlhf/models/score_model/__init__.py@82743cc:L197). For each pair of responses to a prompt, y_w the one
the crowd found more helpful
(`better_response_id`) and y_l the other, the loss is the Bradley-Terry negative log-likelihood

    L_R(phi) = -E[ log sigma( R(y_w, x) - R(y_l, x) ) ]  +  eta * E[ R(y_w, x)^2 + R(y_l, x)^2 ] / 2    (eq. 5)

where the second term is the official optional score regulariser
(safe_rlhf/values/reward/trainer.py@82743cc:L222-230; `--regularization`,
0.001 in the official scripts). Metrics: ranking accuracy (strict R(y_w) > R(y_l); a tie is wrong), and
the mean and standard deviation of all scores, on the test split.

On the toy world (the default) the test split's Bayes ceiling (data/toy/card.json) is the expected accuracy of
a predictor that knows the true helpfulness. The tiny model stays a few points below it, mostly on benign pairs
that differ by one off-topic step: it looks like an on-topic step, yet it is filler and lowers helpfulness.

cost.py trains the cost model with this file's data pipeline and loop; only the pair order, the loss
(eq. 6 instead of eq. 5) and the metrics differ. They are the `Objective` below.

Speed (both on by default; the official loader does neither): pairs are batched by length
(--group_by_length), and each pair is ONE row, its prompt once and then both responses, under a mask
that keeps the second response from seeing the first (--share_prompt, `pack_pairs`): the same scores
and gradients as two right-padded rows, on 16% fewer positions than the pair's tokens instead of 38%
more. `python -m tools.bench` measures it: 1.38x the real tokens/s of a plain shuffled two-row loop (docs/bench.md).

Left out on purpose: the token-wise loss variant (sequence-wise only, as the official scripts use), the
running score normaliser (its statistics are collected but unused by default upstream,
safe_rlhf/models/score_model/__init__.py@82743cc:L221-232),
DeepSpeed/ZeRO (FSDP2 by hand in model.py instead).

Official 7B recipe (safe-rlhf scripts/reward-model.sh@82743cc:L110-140; Args.PAPER), on 8 GPUs:
    torchrun --nproc_per_node 8 reward.py --recipe paper --output_dir runs/reward-7b
Your own data (schema: Objective.required; unusable rows are dropped and counted, load_pairs):
    python reward.py --recipe paper --model_name_or_path runs/sft-mine --dataset train.jsonl --eval_dataset test.jsonl
Toy world (after `python sft.py`):
    python reward.py                               # one CPU process; initialised from runs/sft, writes runs/reward
    torchrun --nproc_per_node 2 reward.py          # two ranks (FSDP2 over gloo on CPU)
    python reward.py --stop_at_step 50 && python reward.py --resume    # an interrupted run, continued exactly

Shape letters: B pairs, L padded sequence length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

import data_rules
import model as M
import plumbing
from plumbing import UserError

# --------------------------------------------------------------------------------------------
# Arguments (cost.py uses the same ones)
# --------------------------------------------------------------------------------------------


@dataclass
class Args:
    # Ranges checked at parse time (plumbing.check_limits); any other number must be finite and >= 0.
    LIMITS: ClassVar[dict] = {"max_length": (2, None), "warmup_ratio": (0, 1), "epochs": (1e-6, None),
                              "adam_beta1": (0, 0.999999), "adam_beta2": (0, 0.999999), **dict.fromkeys(
        ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
         "limit", "eval_limit", "log_every"), (1, None))}
    # --recipe paper: the official 7B settings (the reward and cost scripts are identical)
    PAPER: ClassVar[dict] = {"model_name_or_path": "PKU-Alignment/alpaca-7b-reproduced", "dataset": "PKU-Alignment/PKU-SafeRLHF",
                             "epochs": 2, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16,
                             "gradient_accumulation_steps": 1, "lr": 2e-5, "lr_scheduler_type": "cosine",
                             "warmup_ratio": 0.03, "weight_decay": 0.1, "max_length": 512, "regularization": 0.001,
                             "gradient_checkpointing": True, "drop_duplicates": True}
    PAPER_SOURCE: ClassVar[str] = "safe-rlhf scripts/reward-model.sh and cost-model.sh@82743cc:L110-140"
    DATA_FLAGS: ClassVar[tuple] = ("dataset", "eval_dataset")

    recipe: str = ""
    """toy (the toy world's settings: the defaults listed without --recipe) or paper (the official 7B
    settings; --recipe paper --help lists them); default toy when the data are the toy world's, else required"""

    # data
    dataset: str = "data/toy/preference"
    """hub name (PKU-Alignment/PKU-SafeRLHF) or local .json/.jsonl file or folder of <split>.jsonl"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split for the evaluation ("" for none)"""
    eval_dataset: str | None = None
    """evaluation data (hub name, file or folder), read at --eval_split (or "test" if that is ""); default: --dataset"""
    eval_on_train: bool = False
    """allow evaluation rows that are training rows (refused otherwise); the summary then says so"""
    dataset_revision: str | None = None
    """hub revision of the data set (pin a 2023 one to reproduce the paper, docs/reference.md, "PKU-SafeRLHF")"""
    limit: int | None = None
    """use only the first N training pairs"""
    eval_limit: int | None = None
    """use only the first N evaluation pairs"""
    max_length: int = 512
    """longer sequences (prompt + response + EOS) are truncated on the right and counted in the log (paper 512)"""
    strict: bool = False
    """refuse the data if any row is unusable (default: drop and count it in the data summary)"""
    drop_duplicates: bool = False
    """drop exact repeats of a row (paper recipe: on). The toy world draws its rows with replacement,
    so a repeat there is a draw, not an error (toy: off)"""
    # model
    model_name_or_path: str = "runs/sft"
    """initial score model: the SFT checkpoint (its decoder, a fresh head), a score-model folder or a preset
    (paper: PKU-Alignment/alpaca-7b-reproduced)"""
    tokenizer_name_or_path: str | None = None
    """default: the model's folder"""
    trust_remote_code: bool = False
    """let transformers run code shipped with a hub model"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, about 30% slower; paper on)"""
    # the loss
    regularization: float = 0.001
    """eta: weight of the score regulariser mean(score^2) (paper 0.001: safe-rlhf
    scripts/reward-model.sh@82743cc:L123)"""
    cost_terms: str = "both"
    """cost.py only: eq. 6's terms, both (the paper); classification or ranking alone (the figure 6a ablations)"""
    # optimisation
    epochs: float = 3
    """passes over the training pairs, fractions allowed (paper 2)"""
    max_steps: int = 0
    """optimiser steps of the whole run; overrides --epochs (0: --epochs decides)"""
    per_device_train_batch_size: int = 16
    """pairs per rank per micro-batch (paper 16)"""
    per_device_eval_batch_size: int = 32
    """pairs per rank per evaluation forward (paper 16)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step (paper 1)"""
    lr: float = 1e-4
    """peak learning rate of AdamW (paper 2e-5)"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on biases and norms); paper 0.1"""
    adam_beta1: float = 0.9
    """AdamW beta1 (official 0.9, safe_rlhf/configs/constants.py@82743cc:L53)"""
    adam_beta2: float = 0.95
    """AdamW beta2 (official 0.95)"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (official 1e-8)"""
    lr_scheduler_type: str = "cosine"
    """cosine or linear (warmup, then decay to 0) or constant (paper cosine)"""
    warmup_ratio: float = 0.03
    """fraction of the optimiser steps spent warming up (paper 0.03)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clipping (0: none)"""
    seed: int = 42
    """seed for the score head's initialisation (all ranks) and the data order"""
    group_by_length: bool = True
    """batch pairs of similar length together: less padding, same pairs per epoch (model.epoch_order)"""
    share_prompt: bool = True
    """score a pair's two responses in one row, the shared prompt computed once (pack_pairs); same scores"""
    # sizes derived from the above, filled in after parsing (logged in args.json)
    global_batch_size: int = 0
    """(filled in) pairs per optimiser step = per_device_train_batch_size x ranks x accumulation"""
    steps_per_epoch: int = 0
    """(filled in) optimiser steps per epoch; the last incomplete global batch is dropped"""
    total_steps: int = 0
    """(filled in) optimiser steps of the whole run; the LR schedule is sized for it"""
    # logging, evaluation, checkpoints
    output_dir: str | None = None
    """checkpoint folder (a score model, model.load_score_model), metrics.jsonl, args.json, eval.json;
    default runs/reward (reward.py) or runs/cost (cost.py)"""
    log_every: int = 10
    """print a log line (with throughput and ETA) and write a metrics record every N optimiser steps"""
    eval_every: int = 0
    """also evaluate on the held-out split every N steps (0: only at the end)"""
    save_every: int = 0
    """write a resumable checkpoint every N steps (0: only at the end)"""
    resume: bool = False
    """continue the interrupted run in --output_dir (model, optimiser, schedule, data position, RNG)"""
    overwrite: bool = False
    """replace the run already in --output_dir (refused without it; nothing is deleted before the inputs are checked)"""
    stop_at_step: int = 0
    """stop after this optimiser step and save a resumable checkpoint (0: run to the end)"""
    save: bool = True
    """write checkpoints (--no-save: metrics only, for benchmarks and dry runs)"""


# --------------------------------------------------------------------------------------------
# The math: eq. 5 and the metrics
# --------------------------------------------------------------------------------------------


def reward_loss(better_scores: torch.Tensor, worse_scores: torch.Tensor, regularization: float) -> torch.Tensor:
    """Paper eq. 5, sequence-wise: mean_b[ -log sigma(r_w - r_l) ] + eta * mean over the 2B scores of r^2.
    better_scores r_w: (B,) end scores of the more helpful responses; worse_scores r_l: (B,). -> ()"""
    loss = -F.logsigmoid(better_scores - worse_scores).mean()                           # () eq. 5
    # The official score regulariser keeps scores near 0 (safe_rlhf/values/reward/trainer.py@82743cc:L222-230).
    if regularization > 0:
        loss = loss + regularization * torch.cat([better_scores, worse_scores]).square().mean()  # ()
    return loss


def ranking_accuracy(higher: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose score order is right, strictly: a tie counts as wrong. (B,), (B,) -> ()"""
    return (higher > lower).float().mean()


def reward_metrics(better_scores: torch.Tensor, worse_scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Ranking accuracy and the mean / std of all 2B scores
    (safe_rlhf/values/reward/trainer.py@82743cc:L50-155). labels: unused (B, 0)."""
    scores = torch.cat([better_scores, worse_scores])                                   # (2B,)
    return {"accuracy": ranking_accuracy(better_scores, worse_scores).item(),
            "reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0}


# --------------------------------------------------------------------------------------------
# What differs between reward.py and cost.py: which response comes first, the loss, the metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    score_type: str
    """'reward' or 'cost' (saved in the checkpoint's config.json)"""
    required: tuple[str, ...]
    """fields every row must have"""
    make_pair: Callable[[dict, str], tuple[str, str, list[float]]]
    """row, where (for errors) -> (first response, second response, per-pair labels)"""
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    """first scores (B,), second scores (B,), labels (B, K), regularization -> loss ()"""
    metrics: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]
    """first scores (N,), second scores (N,), labels (N, K) -> {name: value}"""


def response_id(row: dict, field: str, where: str) -> int:
    """PKU-SafeRLHF stores 0/1 ints; "0"/"1" strings are accepted too, anything else is refused."""
    return data_rules.parse_id(row[field], f"{where}: {field}")


def better_worse(row: dict, where: str) -> tuple[str, str, list[float]]:
    """Reward pairs: (y_w, y_l) = (better, worse) from `better_response_id`
    (safe_rlhf/datasets/raw/safe_rlhf.py@82743cc:L35-90)."""
    better = response_id(row, "better_response_id", where)
    return row[f"response_{better}"], row[f"response_{1 - better}"], []


REWARD = Objective(score_type="reward", required=("prompt", "response_0", "response_1", "better_response_id"),
                   make_pair=better_worse, loss=lambda better, worse, labels, eta: reward_loss(better, worse, eta),
                   metrics=reward_metrics)


# --------------------------------------------------------------------------------------------
# Data: preference rows -> tokenised pairs
# --------------------------------------------------------------------------------------------


PAIR_FIELDS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
               "is_response_0_safe", "is_response_1_safe")  # what makes two rows the same row


def load_pairs(dataset: str, split: str, tokenizer, objective: Objective, *, max_length: int, limit: int | None = None,
               revision: str | None = None, drop_duplicates: bool = False, flag: str = "--dataset",
               summary: data_rules.DataSummary | None = None) -> tuple[list[dict], int]:
    """Rows of `split` -> [{"first": ids, "second": ids, "labels": [...], "text": (prompt, first, second),
    "key": row identity, "row": the row}] and how many sequences were truncated at max_length (the one
    loader of preference data: reward.py, cost.py and evaluate.py). Text = template(prompt)
    + response + EOS. Unusable rows are dropped and counted in `summary` by reason: an empty prompt or
    response, labels that contradict each other (objective.make_pair), an exact repeat (with
    --drop_duplicates), a prompt that fills the window, two responses identical after truncation
    (the official loader raises on the last two and on contradictory labels, mid-epoch:
    safe_rlhf/datasets/safety_preference.py@82743cc:L75-95)."""
    summary = summary or data_rules.DataSummary(flag, dataset, split)
    rows = data_rules.load_rows(dataset, split, revision=revision, limit=limit, required=objective.required,
                              text=("prompt", "response_0", "response_1"), what=flag)
    summary.read = len(rows)
    kept, seen = [], set()  # (row number, prompt, first, second, labels, key)
    for i, row in enumerate(rows):
        key = data_rules.row_key(row, PAIR_FIELDS)
        try:
            if not row["prompt"].strip():
                raise data_rules.Unusable("empty prompt")
            if not row["response_0"].strip() or not row["response_1"].strip():
                raise data_rules.Unusable("empty response")
            first, second, labels = objective.make_pair(row, f"{flag} {dataset} (split {split}) row {i}")
            if drop_duplicates and key in seen:
                raise data_rules.Unusable("duplicate")
        except data_rules.LeftOut as e:
            summary.leave_out(str(e), i)
            continue
        except data_rules.Unusable as e:
            summary.drop(str(e), i)
            continue
        seen.add(key)
        kept.append((i, row["prompt"], first, second, labels, key))
    if not kept:
        return [], 0
    eos = tokenizer.eos_token  # the EOS string ends every response; the score is read there
    prompts = [M.format_prompt(k[1]) for k in kept]
    ids = tokenizer([p + k[2] + eos for p, k in zip(prompts, kept)] + [p + k[3] + eos for p, k in zip(prompts, kept)],
                    add_special_tokens=True)["input_ids"]
    prompt_lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    n, pairs, truncated = len(kept), [], 0
    for j, (i, prompt, first, second, labels, key) in enumerate(kept):
        a, b = ids[j][:max_length], ids[n + j][:max_length]      # right truncation (may cut the EOS)
        if prompt_lengths[j] >= max_length:
            summary.drop("prompt fills the window", i)
        elif a == b:
            summary.drop("identical after truncation", i)
        else:
            truncated += (len(ids[j]) > max_length) + (len(ids[n + j]) > max_length)
            pairs.append({"first": a, "second": b, "labels": labels, "text": (prompt, first, second), "key": key,
                          "row": rows[i]})
    summary.stats["truncated_sequences"] = truncated
    label_statistics([p["row"] for p in pairs], summary)
    return pairs, truncated


def label_statistics(rows: list[dict], summary: data_rules.DataSummary) -> None:
    """Label statistics of the used rows, where the fields are there: the share of pairs with both
    responses safe / one / none, and how often the more helpful response is the safer one. A set in
    which every pair has exactly one safe response gets a note: PKU-SafeRLHF has all three kinds, and
    safety fields copied from the preference would teach the cost model the preference."""
    safe, agree = [], []
    for row in rows:
        try:
            safe.append(sum(data_rules.parse_bool(row[f"is_response_{k}_safe"], "") for k in (0, 1)))
        except (KeyError, UserError):
            pass
        try:
            agree.append(data_rules.parse_id(row["better_response_id"], "") == data_rules.parse_id(row["safer_response_id"], ""))
        except (KeyError, UserError):
            pass
    if safe:
        summary.stats.update({"both_safe": safe.count(2) / len(safe), "one_safe": safe.count(1) / len(safe),
                              "both_unsafe": safe.count(0) / len(safe)})
        if len(safe) >= 10 and safe.count(1) == len(safe):
            summary.notes.append("every pair has exactly one safe and one unsafe response: were the safety labels "
                                 "derived from a preference? (PKU-SafeRLHF has both-safe and both-unsafe pairs too)")
    if agree:
        summary.stats["better_is_safer"] = sum(agree) / len(agree)


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """--no-share_prompt: the 2B sequences [first; second] right-padded together to the longest one, so
    one forward scores both halves (as the official code, safe_rlhf/values/reward/trainer.py@82743cc:L178-187).
    Returns input_ids (2B, L), attention_mask (2B, L), labels (B, K)."""
    rows = [p["first"] for p in pairs] + [p["second"] for p in pairs]
    input_ids, attention_mask = M.right_pad(rows, pad_token_id)                  # (2B, L), (2B, L)
    labels = torch.tensor([p["labels"] for p in pairs], dtype=torch.float32).reshape(len(pairs), -1)  # (B, K)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shared_prefix(first: list[int], second: list[int]) -> int:
    """Length of the common start of two token lists (BOS, template, prompt), leaving each at least
    one token of its own (the token its score is read at)."""
    n = 0
    while n < min(len(first), len(second)) - 1 and first[n] == second[n]:
        n += 1
    return n


def packed_length(pair: dict) -> int:
    return len(pair["first"]) + len(pair["second"]) - shared_prefix(pair["first"], pair["second"])


def pack_pairs(pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """--share_prompt (default): each pair in ONE row, prompt once, then both responses:

        row b = [ prefix (n tokens) | rest of first (s0) | rest of second (s1) | pads ]

    The attention mask is causal except that the second response does not see the first, and its
    position ids restart at n, so every token sees exactly what it sees in its own sequence: the
    scores are those of two separate rows (tests/test_supervised.py checks scores and gradients),
    for n fewer tokens per pair. Returns input_ids (B, L), attention_mask (B, 1, L, L) bool,
    position_ids (B, L), ends (B, 2) = positions of the first's and the second's last token, labels (B, K)."""
    lengths = lambda half: torch.tensor([len(p[half]) for p in pairs])[:, None, None]  # noqa: E731  (B, 1, 1)
    n = torch.tensor([shared_prefix(p["first"], p["second"]) for p in pairs])[:, None, None]   # (B, 1, 1)
    s0 = lengths("first") - n                                          # (B, 1, 1) the first response's own tokens
    end = lengths("first") + lengths("second") - n                     # (B, 1, 1) the row's real length
    L = int(end.max())
    input_ids = torch.full((len(pairs), L), pad_token_id, dtype=torch.long)                     # (B, L)
    for b, (p, k) in enumerate(zip(pairs, n.flatten().tolist())):
        row = p["first"] + p["second"][k:]
        input_ids[b, :len(row)] = torch.tensor(row)
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]          # query and key positions (L, 1), (1, L)
    second_q = (q >= n + s0) & (q < end)                               # (B, L, 1) queries in the second response
    first_k = (k >= n) & (k < n + s0)                                  # (B, 1, L) keys in the first response
    mask = (k <= q) & (k < end) & ~(second_q & first_k)                # (B, L, L)
    mask |= (q >= end) & (k == 0)  # a pad query attends to token 0 only (a row without keys is NaN in SDPA)
    position_ids = torch.where(q.T >= n[:, 0] + s0[:, 0], q.T - s0[:, 0], q.T)                  # (B, L)
    ends = torch.cat([n + s0 - 1, end - 1], dim=-1).reshape(len(pairs), 2)                      # (B, 2)
    labels = torch.tensor([p["labels"] for p in pairs], dtype=torch.float32).reshape(len(pairs), -1)  # (B, K)
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids, "ends": ends,
            "labels": labels}


def make_batch(args: Args):
    return pack_pairs if args.share_prompt else collate_pairs


def forward_pairs(model, batch: dict[str, torch.Tensor], d: M.Dist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward scores both halves of every pair (pack_pairs or collate_pairs). -> (B,), (B,), labels (B, K)"""
    batch = {k: t.to(d.device) for k, t in batch.items()}
    labels = batch["labels"]
    with M.autocast(d):
        if "ends" in batch:   # packed rows: the scores at each response's last token
            scores = model(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"])  # (B, L)
            end_scores = scores.gather(1, batch["ends"])                          # (B, 2) fp32
            return end_scores[:, 0], end_scores[:, 1], labels
        end_scores = model(batch["input_ids"], batch["attention_mask"], right_padded=True).end_scores  # (2B,) fp32
    B = labels.shape[0]
    return end_scores[:B], end_scores[B:], labels


@torch.no_grad()
def evaluate(model, pairs: list[dict], args: Args, d: M.Dist, tokenizer, objective: Objective) -> tuple[dict, list]:
    """Scores of every held-out pair, gathered from all ranks, then the objective's metrics."""
    model.eval()
    results, table = {}, []
    for indices, real in plumbing.rank_batches(len(pairs), args.per_device_eval_batch_size, d.rank, d.world_size):
        batch = make_batch(args)([pairs[i] for i in indices], tokenizer.pad_token_id)
        first, second, lab = (x.tolist() for x in forward_pairs(model, batch, d))
        results.update({i: (f, s, la) for i, keep, f, s, la in zip(indices, real, first, second, lab) if keep})
        if not table:  # a few rows to read (this rank's first batch): prompt, both responses, their scores
            table = [(*pairs[i]["text"], f, s) for i, f, s in list(zip(indices, first, second))[:3]]
    model.train()
    first, second, labels = (torch.tensor(x) for x in zip(*M.gather_in_order(results, len(pairs))))
    metrics = {f"eval/{k}": v for k, v in objective.metrics(first, second, labels).items()}
    return metrics, table


# --------------------------------------------------------------------------------------------
# Run phases: the steps train() takes, in its order, each a small function of the run's state
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the phases share: the set-up, the data, the trained score model and where the loop stands."""
    args: Args
    d: M.Dist
    tokenizer: object
    objective: Objective
    data: data_rules.TrainingData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int
    """optimiser steps taken: the data position, all --resume needs to continue the data"""
    last_step: int
    """where this process stops: args.total_steps, or --stop_at_step before it"""


def stage_hint(args: Args) -> str:
    """What to do when the default initial model, runs/sft, is missing."""
    return "run sft.py first" if args.model_name_or_path == Args.model_name_or_path else ""


def load_tokenizer(args: Args):
    """The initial model's tokenizer (or --tokenizer_name_or_path's), once its folder is known to exist."""
    hint = stage_hint(args)
    if hint and not Path(args.model_name_or_path).exists():
        # The default "runs/sft" has one slash, so it would pass for a hub name "org/name" and end in a
        # hub-connection error; the default is always a local folder: say what is wrong instead.
        raise UserError(f"checkpoint {args.model_name_or_path} does not exist ({hint})")
    if args.model_name_or_path not in M.PRESETS:
        # The folder before its tokenizer: a wrong folder gets the checkpoint message, not a tokenizer one.
        M.check_checkpoint_path(args.model_name_or_path, hint)
    return M.load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path, "right",
                            trust_remote_code=args.trust_remote_code)


def load_data(args: Args, d: M.Dist, tokenizer, objective: Objective) -> data_rules.TrainingData:
    """The training split and the held-out one (refused where it holds training rows), summarised."""
    summaries = {"train": data_rules.DataSummary("--dataset", args.dataset, args.train_split)}
    load = dict(max_length=args.max_length, drop_duplicates=args.drop_duplicates)
    train_pairs, train_truncated = load_pairs(args.dataset, args.train_split, tokenizer, objective, limit=args.limit,
                                              revision=args.dataset_revision, summary=summaries["train"], **load)
    eval_pairs, eval_truncated = [], 0
    eval_split = args.eval_split or ("test" if args.eval_dataset else "")  # evaluation data by name: evaluate
    if eval_split:
        flag = "--eval_dataset" if args.eval_dataset else "--dataset"
        summaries["eval"] = data_rules.DataSummary(flag, args.eval_dataset or args.dataset, eval_split)
        eval_pairs, eval_truncated = load_pairs(args.eval_dataset or args.dataset, eval_split, tokenizer, objective,
                                                limit=args.eval_limit, flag=flag, summary=summaries["eval"], **load,
                                                revision=None if args.eval_dataset else args.dataset_revision)
        data_rules.check_eval_rows(args, {p["key"] for p in train_pairs}, [p["key"] for p in eval_pairs], summaries["eval"])
    else:
        summaries["train"].notes.append("no held-out evaluation (--eval_split ''): give --eval_dataset for one")
    return data_rules.TrainingData(train_pairs, train_truncated, eval_pairs, eval_truncated,
                data_rules.report_data(summaries, args.strict, d.is_main))


def derive_sizes(args: Args, d: M.Dist, train_pairs: int) -> None:
    """Fill in the sizes derived from the others (logged in args.json); refuse a run without a step."""
    args.global_batch_size = args.per_device_train_batch_size * d.world_size * args.gradient_accumulation_steps
    args.steps_per_epoch = train_pairs // args.global_batch_size
    args.total_steps = args.max_steps or int(args.epochs * args.steps_per_epoch)
    if args.steps_per_epoch == 0:
        raise UserError(f"--dataset {args.dataset}: {train_pairs} usable training pairs, fewer than one global "
                          f"batch of {args.global_batch_size}; lower --per_device_train_batch_size or --gradient_accumulation_steps")
    if args.total_steps == 0:
        raise UserError(f"--epochs {args.epochs}: less than one optimiser step ({args.steps_per_epoch} per epoch)")


def start_training(args: Args, d: M.Dist, tokenizer, objective: Objective, data: data_rules.TrainingData, resume_state: dict | None) -> Run:
    """The score model (same seed on every rank: identical head initialisation; then sharded), its
    optimiser and schedule; with --resume, their saved states, the data position and the RNG states."""
    M.seed_everything(args.seed)
    init_from = args.output_dir if resume_state else args.model_name_or_path
    # Under torchrun only rank 0 reads the weights; the others build a meta skeleton and receive
    # rank 0's weights when prepare_model shards the model (one CPU copy per node).
    model = M.load_score_model(init_from, tokenizer, objective.score_type, trust_remote_code=args.trust_remote_code,
                               stage_hint=stage_hint(args), meta=d.enabled and not d.is_main,
                               accept=("policy", objective.score_type),
                               flag="--output_dir" if resume_state else "--model_name_or_path")
    M.print0(f"{objective.score_type} model from {init_from}: {plumbing.count_parameters(model) / 1e6:.2f}M parameters")
    M.check_max_length(model, args.max_length, max(len(p[half]) for p in data.train + data.eval for half in ("first", "second")))
    if args.share_prompt:
        M.check_packing(model)  # packed pairs need an attention that takes their 4D mask
    model = M.prepare_model(model, d, trainable=True, bf16=d.device.type == "cuda",
                            activation_checkpointing=args.gradient_checkpointing)
    model.train()
    optimizer = plumbing.make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scheduler = plumbing.make_scheduler(optimizer, args.lr_scheduler_type,
                                 warmup_steps=int(args.warmup_ratio * args.total_steps), total_steps=args.total_steps)
    step = 0
    if resume_state:
        trainer_state = resume_state["json"]["trainer"]
        plumbing.check_same_run(trainer_state, {"train_rows": len(data.train), "global_batch_size": args.global_batch_size,
                                         "total_steps": args.total_steps, "group_by_length": args.group_by_length})
        plumbing.load_optimizer_state(model, optimizer, "optimizer", resume_state)
        scheduler.load_state_dict(trainer_state["scheduler"])
        plumbing.restore_rng_states(resume_state, d, args.seed, trainer_state["step"])
        step = trainer_state["step"]
        plumbing.check_not_finished(args.output_dir, step, args.total_steps)
        M.print0(f"resuming {args.output_dir} at step {step}/{args.total_steps}")
    else:
        M.seed_everything(args.seed + d.rank)  # per-rank seed for anything random from here on
    last_step = min(args.total_steps, args.stop_at_step) if args.stop_at_step else args.total_steps
    return Run(args, d, tokenizer, objective, data, model, optimizer, scheduler, step, last_step)


def open_output_folder(run: Run, resumed: bool) -> plumbing.JsonlLogger:
    """Write the run's arguments and data summary, and open metrics.jsonl (trimmed to the checkpoint
    with --resume; a fresh run replaces an older run's files)."""
    args, data, output_dir = run.args, run.data, Path(run.args.output_dir)
    logger = plumbing.JsonlLogger(output_dir / "metrics.jsonl", enabled=run.d.is_main)
    plumbing.write_run_files(args, run.step, data.summary, run.d.is_main)  # --overwrite: the old run aside until the first save
    M.print0(plumbing.recipe_line(args))
    M.print0(f"data: {len(data.train)} train pairs ({data.train_truncated} sequences truncated at {args.max_length} "
             f"tokens), {len(data.eval)} eval pairs ({data.eval_truncated} truncated) | global batch "
             f"{args.global_batch_size} pairs | {args.total_steps} steps")
    if not resumed:  # a resumed run's data are checked equal to the ones logged here
        logger.log({"step": run.step, "data/train_pairs": len(data.train), "data/train_truncated": data.train_truncated,
                    "data/eval_pairs": len(data.eval), "data/eval_truncated": data.eval_truncated})
    return logger


def final_evaluation(run: Run, logger: plumbing.JsonlLogger) -> None:
    """The objective's metrics on the held-out pairs -> eval.json, and a few scored pairs to read."""
    if not run.data.eval:
        return
    results, table = evaluate(run.model, run.data.eval, run.args, run.d, run.tokenizer, run.objective)
    results = {"step": run.step, **results}
    logger.log(results)
    M.print0("eval | " + plumbing.log_line(results))
    for prompt, first, second, s1, s2 in table:
        M.print0(f"  {prompt!r}: {s1:+.2f} {first!r} | {s2:+.2f} {second!r}")
    if run.d.is_main:
        plumbing.write_json_atomic(Path(run.args.output_dir) / "eval.json", results)


# --------------------------------------------------------------------------------------------
# The loop shared by reward.py and cost.py
# --------------------------------------------------------------------------------------------


def train(args: Args, objective: Objective) -> None:
    # ---- distributed setup, the run folder -----------------------------------------------------
    if objective.score_type == "reward" and args.cost_terms != "both":
        raise UserError(f"--cost_terms {args.cost_terms} is a cost.py setting; reward.py trains eq. 5")
    d = M.init_distributed()
    if args.dataset == Args.dataset:  # the default data: create the toy world if missing
        import toyworld
        toyworld.ensure_toy_data(Path(args.dataset).parent)
    args.output_dir = str(Path(args.output_dir or f"runs/{objective.score_type}"))
    # Claim the folder before reading anything: locked for this run, never another run's without
    # --overwrite, and with --resume the saved arguments must match (fails before anything is written).
    lock, resume_state = plumbing.open_run_folder(args, d.world_size, d.is_main, objective.score_type)  # noqa: F841 - held to the end

    # ---- tokenizer and data (validated before the output folder is touched) -------------------
    tokenizer = load_tokenizer(args)
    data = load_data(args, d, tokenizer, objective)
    derive_sizes(args, d, len(data.train))

    # ---- model, optimiser, schedule (or the saved ones, with --resume) --------------------------
    run = start_training(args, d, tokenizer, objective, data, resume_state)
    model = run.model

    # ---- the output folder: only now, after every input was validated --------------------------
    logger = open_output_folder(run, bool(resume_state))

    # ---- the loop: optimiser steps, each over gradient_accumulation_steps micro-batches --------
    b, world, accum = args.per_device_train_batch_size, d.world_size, args.gradient_accumulation_steps
    bar = plumbing.progress(total=run.last_step, initial=run.step, enabled=d.is_main, desc=objective.score_type)
    # a pair's row length: both responses after one prompt (--share_prompt), else the longer sequence
    row_length = packed_length if args.share_prompt else (lambda p: max(len(p["first"]), len(p["second"])))
    row_lengths = [row_length(p) for p in data.train]     # once: grouping and the token counts read them
    rows_per_pair = 1 if args.share_prompt else 2
    t0 = time.time()
    meter = plumbing.Throughput(run.step, run.last_step)
    for global_batch in plumbing.global_batches(args, len(data.train), row_lengths if args.group_by_length else None,
                                       run.step, run.last_step):
        # ======== 1. the step's token counts ======================================================
        # Token counts (every rank knows every micro-batch: no communication): the tokens of the step's
        # 2 x pairs sequences, and the token positions its forwards computed (padding included, each
        # shared prompt once): a micro-batch is rows_per_pair x pairs rows as long as its longest row.
        micro = [global_batch[lo:lo + b] for lo in range(0, len(global_batch), b)]
        real_tokens = sum(len(data.train[i]["first"]) + len(data.train[i]["second"]) for i in global_batch)
        computed_tokens = sum(rows_per_pair * len(mb) * max(row_lengths[i] for i in mb) for mb in micro)

        # ======== 2. forward and backward, this rank's micro-batches one by one ===================
        firsts, seconds, labels = [], [], []
        step_loss = torch.zeros((), device=d.device)
        for m in range(accum):
            mine = global_batch[(m * world + d.rank) * b:(m * world + d.rank + 1) * b]   # this rank's micro-batch
            batch = make_batch(args)([data.train[i] for i in mine], tokenizer.pad_token_id)
            first, second, lab = forward_pairs(model, batch, d)
            # Loss normalisation under accumulation: the mean over the pairs of the whole optimiser step
            # (all micro-batches, all ranks): each micro-batch's mean is weighted by its pair count over
            # the step's pair count. FSDP averages gradients over ranks, hence the factor world_size.
            loss = objective.loss(first, second, lab, args.regularization) * len(mine) / args.global_batch_size
            (loss * world).backward()
            step_loss += loss.detach()
            firsts.append(first.detach()), seconds.append(second.detach()), labels.append(lab)

        # ======== 3. the optimiser step ============================================================
        grad_norm = plumbing.clip_grad_norm(model, args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        meter.add(tokens=real_tokens, pairs=len(global_batch))
        step_loss = M.all_reduce(step_loss)  # the mean loss over the step's pairs
        plumbing.check_finite(step_loss, "train/loss", run.step)

        # ======== 4. logging, evaluation, checkpoints ==============================================
        step_pairs = M.gather_in_order({d.rank: [torch.cat(x).tolist() for x in (firsts, seconds, labels)]}, world)
        first, second, lab = (torch.tensor([v for part in step_pairs for v in part[k]]) for k in range(3))  # all ranks'
        record = {"step": run.step, "epoch": run.step / args.steps_per_epoch, "train/loss": step_loss.item(),
                  **{f"train/{k}": v for k, v in objective.metrics(first, second, lab).items()},
                  "train/grad_norm": grad_norm.item(), "train/lr": run.scheduler.get_last_lr()[0],
                  "train/real_tokens": real_tokens, "train/computed_tokens": computed_tokens,
                  "memory/peak_gib": plumbing.peak_memory_gib(d.device), "time": time.time() - t0}
        bar.update(1)
        bar.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/accuracy']:.2f}")
        if args.eval_every and run.step % args.eval_every == 0 and run.data.eval and run.step < args.total_steps:
            record.update(evaluate(run.model, run.data.eval, args, run.d, run.tokenizer, run.objective)[0])
        plumbing.log_record(record, run.step, run.last_step, args.log_every, logger, bar, meter, run.d.is_main)
        if plumbing.save_due(args, run.step, run.last_step):  # the score model (model.load_score_model reads it) and what --resume needs
            train_state = plumbing.trainer_state(args, run.d, run.model, run.optimizer, run.scheduler, run.step,
                                                 len(run.data.train), final=run.step == args.total_steps,
                                                 stage=run.objective.score_type)
            M.save_checkpoint(Path(args.output_dir), run.d, run.tokenizer, {"": run.model}, train_state=train_state)
    bar.close()
    M.print0(f"trained: {meter.summary(run.step)}")
    if run.step < args.total_steps:
        M.print0(f"stopped at step {run.step}/{args.total_steps}; continue with --resume")
        return

    # ---- final evaluation on the held-out split ----------------------------------------------
    final_evaluation(run, logger)
    M.print0(f"{'saved' if args.save else 'done (--no-save)'} {args.output_dir} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    plumbing.run_main(lambda: train(plumbing.parse_args(Args, description=__doc__.split("\n")[0]), REWARD))
    M.teardown_distributed()
