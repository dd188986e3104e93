"""sft.py: supervised fine-tuning, the first stage of Safe RLHF (Dai et al. 2023, section 3 and appendix B).

What it optimises. Each (request x, response y) of an instruction data set (Alpaca by default) becomes
the text  BOS "BEGINNING OF CONVERSATION: USER: {x} ASSISTANT:" y EOS  (the official template, y
appended directly after "ASSISTANT:", safe_rlhf/datasets/supervised.py@82743cc:L54-66), and the loss is the
negative log-likelihood
of the response tokens and the EOS only:

    L_SFT(theta) = -(1/N) sum_{(x, y)} sum_{t=1}^{|y|+1} log pi_theta(y_t | x, y_<t)

Prompt tokens (BOS included) and padding carry the label -100 and no loss
(safe_rlhf/datasets/supervised.py@82743cc:L63-65). N is the
number of target tokens of the whole optimiser step, over every micro-batch and every rank: a token-level
mean, as the official loss is inside one micro-batch.

On the toy world (the default) the SFT corpus answers about half of the harmful requests; the trained
policy must reproduce that mix. At the end the policy samples responses to the world's evaluation prompts
and the oracle (toyworld.judge) reports their unsafe rate next to the corpus's.

Speed: rows are batched by length (--group_by_length, on by default; the official loader shuffles
without grouping), so right padding wastes little compute (`python -m tools.bench` measures it).

Left out on purpose: multi-turn dialogue data, the official dataset-mixing syntax (`alpaca:0.75 ...`),
DeepSpeed/ZeRO (FSDP2 by hand in model.py instead).

Official 7B recipe (safe-rlhf scripts/sft-deepspeed.sh@82743cc:L110-132; Args.PAPER), on 8 GPUs:
    torchrun --nproc_per_node 8 sft.py --recipe paper --output_dir runs/sft-7b
Toy world:
    python sft.py                                  # one CPU process; creates data/toy if missing, writes runs/sft
    torchrun --nproc_per_node 2 sft.py             # two ranks (FSDP2 over gloo on CPU)
    python sft.py --stop_at_step 20 && python sft.py --resume    # an interrupted run, continued exactly

Shape letters: B batch (sequences), L padded sequence length, V vocabulary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

import data_rules
import model as M
import plumbing
from plumbing import UserError

# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class Args:
    # Ranges checked at parse time (plumbing.check_limits); any other number must be finite and >= 0.
    LIMITS: ClassVar[dict] = {"max_length": (2, None), "warmup_ratio": (0, 1), "epochs": (1e-6, None),
                              "adam_beta1": (0, 0.999999), "adam_beta2": (0, 0.999999), **dict.fromkeys(
        ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
         "limit", "eval_limit", "log_every", "max_new_tokens"), (1, None))}
    # --recipe paper: the official 7B settings (safe-rlhf scripts/sft-deepspeed.sh@82743cc:L110-132)
    PAPER: ClassVar[dict] = {"model_name_or_path": "huggyllama/llama-7b", "dataset": "tatsu-lab/alpaca", "eval_split": "",
                             "epochs": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8,
                             "lr": 2e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0,
                             "max_length": 512, "gradient_checkpointing": True, "drop_duplicates": True}
    PAPER_SOURCE: ClassVar[str] = "safe-rlhf scripts/sft-deepspeed.sh@82743cc:L110-132"
    DATA_FLAGS: ClassVar[tuple] = ("dataset", "eval_dataset")

    recipe: str = ""
    """toy (the toy world's settings: the defaults listed without --recipe) or paper (the official 7B
    settings; --recipe paper --help lists them); default toy when the data are the toy world's, else required"""

    # data
    dataset: str = "data/toy/sft"
    """hub name (tatsu-lab/alpaca) or local .json/.jsonl file or folder of <split>.jsonl; alpaca schema"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split for the evaluation ("" for none; Alpaca has no test split, so paper "")"""
    eval_dataset: str | None = None
    """evaluation data (hub name, file or folder), read at --eval_split (or "test" if that is ""); default: --dataset"""
    eval_on_train: bool = False
    """allow evaluation rows that are training rows (refused otherwise); the summary then says so"""
    dataset_revision: str | None = None
    """hub revision of the data set (a commit or tag), for reproducibility"""
    limit: int | None = None
    """use only the first N training rows"""
    eval_limit: int | None = None
    """use only the first N evaluation rows"""
    max_length: int = 512
    """longer sequences (prompt + response + EOS) are truncated on the right and counted in the log (paper 512)"""
    strict: bool = False
    """refuse the data if any row is unusable (default: drop and count it in the data summary)"""
    drop_duplicates: bool = False
    """drop exact repeats of a row (paper recipe: on). The toy world draws its rows with replacement,
    so a repeat there is a draw, not an error (toy: off)"""
    # model
    model_name_or_path: str = "toy-small"
    """initial policy: a model.py preset (random init) or a causal-LM checkpoint folder / hub name (paper
    huggyllama/llama-7b)"""
    tokenizer_name_or_path: str | None = None
    """default: the model's folder; for a preset, the toy world's tokenizer next to --dataset"""
    trust_remote_code: bool = False
    """let transformers run code shipped with a hub model"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, about 30% slower; paper on)"""
    # optimisation
    epochs: float = 10
    """passes over the training set, fractions allowed (paper 3; a random-init toy model needs more)"""
    max_steps: int = 0
    """optimiser steps of the whole run; overrides --epochs (0: --epochs decides)"""
    per_device_train_batch_size: int = 32
    """sequences per rank per micro-batch (paper 4)"""
    per_device_eval_batch_size: int = 64
    """sequences per rank per evaluation forward"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step (paper 8)"""
    lr: float = 3e-3
    """peak learning rate of AdamW (paper 2e-5; a random-init toy model needs far more)"""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on biases and norms); paper 0.0"""
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
    """seed for weight initialisation (all ranks), data order and sampling"""
    group_by_length: bool = True
    """batch rows of similar length together: less padding, same rows per epoch (model.epoch_order)"""
    # sizes derived from the above, filled in after parsing (logged in args.json)
    global_batch_size: int = 0
    """(filled in) sequences per optimiser step = per_device_train_batch_size x ranks x accumulation"""
    steps_per_epoch: int = 0
    """(filled in) optimiser steps per epoch; the last incomplete global batch is dropped"""
    total_steps: int = 0
    """(filled in) optimiser steps of the whole run; the LR schedule is sized for it"""
    # logging, evaluation, checkpoints
    output_dir: str = "runs/sft"
    """checkpoint folder (loadable with AutoModelForCausalLM), plus metrics.jsonl, args.json, eval.json"""
    log_every: int = 10
    """print a log line (with throughput and ETA) and write a metrics record every N optimiser steps"""
    eval_every: int = 0
    """also evaluate the held-out loss every N steps (0: only at the end)"""
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
    toy_eval_samples: int = 8
    """toy world only: responses sampled per evaluation prompt and judged by the oracle (0: skip)"""
    max_new_tokens: int = 64
    """toy world only: longest sampled response, in tokens"""


# --------------------------------------------------------------------------------------------
# The math: the summed token loss (which tokens carry it: model.tokenize_prompt_response)
# --------------------------------------------------------------------------------------------


def sft_loss_sum(logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the target tokens and their count; the caller divides by the step's count.
    logprobs: (B, L-1), entry t = log pi(x_{t+1} | x_<=t) (the one-token shift, model.sequence_logprobs);
    labels: (B, L). Returns (loss_sum (), n_targets ())."""
    target_mask = (labels[:, 1:] != M.IGNORE_INDEX).float()  # (B, L-1) 1 where token t+1 is a target
    loss_sum = -(logprobs * target_mask).sum()                # ()
    return loss_sum, target_mask.sum()


# --------------------------------------------------------------------------------------------
# Data: alpaca rows -> token ids and labels
# --------------------------------------------------------------------------------------------


SFT_FIELDS = ("instruction", "input", "output")  # what makes two rows the same row


def load_examples(dataset: str, split: str, tokenizer, *, max_length: int, limit: int | None = None,
                  revision: str | None = None, drop_duplicates: bool = False, flag: str = "--dataset",
                  summary: data_rules.DataSummary | None = None) -> tuple[list[dict], int]:
    """Rows of `split` -> [{"input_ids", "labels", "key"}], and how many were truncated at max_length.
    Alpaca schema: request = instruction (+ " " + input), response = output. model.tokenize_prompt_response
    builds BOS + template(request) + response + EOS string, right-truncated, and labels -100 on the
    prompt (BOS included): only the response tokens and the EOS are trained
    (safe_rlhf/datasets/supervised.py@82743cc:L54-66). Unusable rows are dropped and counted in
    `summary`: an empty instruction or output, an exact repeat (drop_duplicates), a prompt that
    fills the window (no response token left to train on). ppo_lagrangian.py reads its PTX rows here too."""
    summary = summary or data_rules.DataSummary(flag, dataset, split)
    rows = data_rules.load_rows(dataset, split, revision=revision, limit=limit, required=("instruction", "output"),
                              text=SFT_FIELDS, what=flag)
    summary.read, kept, seen = len(rows), [], set()
    for i, row in enumerate(rows):
        key = data_rules.row_key(row, SFT_FIELDS)
        reason = ("empty prompt" if not row["instruction"].strip() else "empty response" if not row["output"].strip()
                  else "duplicate" if drop_duplicates and key in seen else None)
        if reason:
            summary.drop(reason, i)
        else:
            seen.add(key)
            kept.append(i)
    examples, _ = M.tokenize_prompt_response(tokenizer, [data_rules.alpaca_request(rows[i]) for i in kept],
                                             [rows[i]["output"] for i in kept], max_length)
    usable, truncated = [], 0
    for i, example in zip(kept, examples):
        if all(label == M.IGNORE_INDEX for label in example["labels"]):
            summary.drop("prompt fills the window", i)
        else:
            truncated += example["truncated"]
            usable.append({**example, "key": data_rules.row_key(rows[i], SFT_FIELDS)})
    summary.stats["truncated_sequences"] = truncated
    return usable, truncated


def toy_root(dataset: str) -> Path | None:
    """The toy-world folder `dataset` belongs to (it holds card.json), else None."""
    parent = Path(dataset).parent
    return parent if (parent / "card.json").is_file() else None


# --------------------------------------------------------------------------------------------
# Evaluation: held-out token loss; on the toy world, the oracle's verdict on sampled responses
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(policy, examples: list[dict], args: Args, d: M.Dist, pad_token_id: int) -> dict:
    """Token-level mean NLL of the response tokens of the held-out split (summed over ranks)."""
    policy.eval()
    loss_sum = torch.zeros((), device=d.device)
    n_targets = torch.zeros((), device=d.device)
    for indices, real in plumbing.rank_batches(len(examples), args.per_device_eval_batch_size, d.rank, d.world_size):
        batch = [examples[i] for i in indices]
        input_ids, attention_mask, labels = (t.to(d.device) for t in M.collate_right(batch, pad_token_id))
        keep = torch.tensor(real, device=d.device)                                   # (B,) repeats count 0
        labels = torch.where(keep[:, None], labels, M.IGNORE_INDEX)
        with M.autocast(d):
            logprobs = M.policy_logprobs(policy, input_ids, attention_mask, right_padded=True)  # (B, L-1)
        s, n = sft_loss_sum(logprobs.float(), labels)
        loss_sum, n_targets = loss_sum + s, n_targets + n
    policy.train()
    loss = M.all_reduce(loss_sum) / M.all_reduce(n_targets).clamp(min=1)
    return {"eval/loss": loss.item(), "eval/perplexity": loss.exp().item()}


@torch.no_grad()
def evaluate_toy_world(policy, tokenizer, root: Path, args: Args, d: M.Dist) -> tuple[dict, list[dict]]:
    """Sample `toy_eval_samples` responses per evaluation prompt (temperature 1, KV cache) and judge
    them with the oracle: unsafe rate on harmful prompts (vs the corpus's), helpfulness and
    over-refusal on benign ones. Returns the metrics and the first sample of each prompt."""
    import toyworld  # only the toy world needs it; real-data runs never import it

    card = json.loads((root / "card.json").read_text())
    rows = data_rules.load_rows(str(root / "eval" / "prompts.jsonl"), "eval", required=("prompt", "is_harmful"))
    prompts = [row["prompt"] for row in rows for _ in range(args.toy_eval_samples)]
    generator = torch.Generator(device=d.device).manual_seed(args.seed + d.rank)   # per-rank sampling seed
    results = {}
    policy.eval()
    with M.gathered_weights(policy):
        for indices, real in plumbing.rank_batches(len(prompts), args.per_device_eval_batch_size, d.rank, d.world_size):
            rows = M.encode_prompts(tokenizer, [prompts[i] for i in indices])
            input_ids, attention_mask = M.left_pad(rows, tokenizer.pad_token_id)   # (B, S) last prompt token last
            with M.autocast(d):
                sequences, mask = M.sample(policy, input_ids.to(d.device), attention_mask.to(d.device),
                                           max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id, unk_token_id=tokenizer.unk_token_id,
                                           temperature=1.0, generator=generator)  # a sampled UNK: a hole, as in the rollouts
            S = input_ids.shape[1]
            for i, keep, seq, m in zip(indices, real, sequences.cpu(), mask.cpu()):
                if keep:  # not a repeat that only keeps the ranks in lockstep
                    response_ids = seq[S:][m[S:].bool()].tolist()               # up to and including EOS
                    results[i] = (tokenizer.decode(response_ids, skip_special_tokens=True),
                                  tokenizer.eos_token_id not in response_ids)
    policy.train()
    responses, no_eos = zip(*M.gather_in_order(results, len(prompts)))
    every, seen = (toyworld.oracle_verdicts(prompts, responses, subset) for subset in ("all", "seen"))
    rate = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    examples = []
    for i in range(0, len(prompts), args.toy_eval_samples):  # the first sample of each prompt, to read
        j = toyworld.judge(prompts[i], responses[i])
        examples.append({"prompt": prompts[i], "held_out": toyworld.find_request(prompts[i]).held_out,
                         "response": responses[i], "is_safe": j.is_safe, "helpfulness": j.helpfulness,
                         "harm": j.harm})
    return {"toy/unsafe_rate": rate(every["unsafe"]),                        # on every harmful eval prompt
            "toy/unsafe_rate_seen": rate(seen["unsafe"]),                    # training phrasings only
            "toy/corpus_unsafe_rate": card["sft_unsafe_rate"]["train"],
            "toy/helpfulness_benign": rate(every["helpfulness_benign"]),
            "toy/over_refusal_rate": rate(every["refused"]),
            "toy/no_eos_rate": rate(no_eos),
            "toy/samples": len(prompts)}, examples


# --------------------------------------------------------------------------------------------
# Run phases: the steps main() takes, in its order, each a small function of the run's state
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the phases share: the set-up, the data, the trained policy and where the loop stands."""
    args: Args
    d: M.Dist
    tokenizer: object
    data: data_rules.TrainingData
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int
    """optimiser steps taken: the data position, all --resume needs to continue the data"""
    last_step: int
    """where this process stops: args.total_steps, or --stop_at_step before it"""


def tokenizer_path(args: Args, root: Path | None) -> str:
    """--tokenizer_name_or_path, else the model's folder; a preset (random init) has none: the toy world's."""
    if args.tokenizer_name_or_path is not None:
        return args.tokenizer_name_or_path
    if args.model_name_or_path in M.PRESETS:
        if root is None:
            raise UserError(f"--model_name_or_path {args.model_name_or_path} is a preset: "
                            "give --tokenizer_name_or_path (or toy-world data, which carries one)")
        return str(root / "tokenizer")
    # The folder before its tokenizer: a missing model gets the checkpoint message.
    M.check_checkpoint_path(args.model_name_or_path)
    return args.model_name_or_path


def load_data(args: Args, d: M.Dist, tokenizer) -> data_rules.TrainingData:
    """The training split and the held-out one (refused where it holds training rows), summarised."""
    summaries = {"train": data_rules.DataSummary("--dataset", args.dataset, args.train_split)}
    load = dict(max_length=args.max_length, drop_duplicates=args.drop_duplicates)
    train_examples, train_truncated = load_examples(args.dataset, args.train_split, tokenizer, limit=args.limit,
                                                    revision=args.dataset_revision, summary=summaries["train"], **load)
    eval_examples, eval_truncated = [], 0
    eval_split = args.eval_split or ("test" if args.eval_dataset else "")  # evaluation data by name: evaluate
    if eval_split:
        flag = "--eval_dataset" if args.eval_dataset else "--dataset"
        summaries["eval"] = data_rules.DataSummary(flag, args.eval_dataset or args.dataset, eval_split)
        eval_examples, eval_truncated = load_examples(args.eval_dataset or args.dataset, eval_split, tokenizer,
                                                      limit=args.eval_limit, flag=flag, summary=summaries["eval"],
                                                      revision=None if args.eval_dataset else args.dataset_revision, **load)
        data_rules.check_eval_rows(args, {e["key"] for e in train_examples}, [e["key"] for e in eval_examples],
                                 summaries["eval"])
    else:
        summaries["train"].notes.append("no held-out evaluation (--eval_split ''): give --eval_dataset for one")
    return data_rules.TrainingData(train_examples, train_truncated, eval_examples, eval_truncated,
                data_rules.report_data(summaries, args.strict, d.is_main))


def derive_sizes(args: Args, d: M.Dist, train_rows: int) -> None:
    """Fill in the sizes derived from the others (logged in args.json); refuse a run without a step."""
    args.global_batch_size = args.per_device_train_batch_size * d.world_size * args.gradient_accumulation_steps
    args.steps_per_epoch = train_rows // args.global_batch_size
    args.total_steps = args.max_steps or int(args.epochs * args.steps_per_epoch)
    if args.steps_per_epoch == 0:
        raise UserError(f"--dataset {args.dataset}: {train_rows} usable training rows, fewer than one global "
                          f"batch of {args.global_batch_size}; lower --per_device_train_batch_size or --gradient_accumulation_steps")
    if args.total_steps == 0:
        raise UserError(f"--epochs {args.epochs}: less than one optimiser step ({args.steps_per_epoch} per epoch)")


def start_training(args: Args, d: M.Dist, tokenizer, data: data_rules.TrainingData, resume_state: dict | None) -> Run:
    """The policy (same seed on every rank: identical initial weights; then sharded), its optimiser and
    schedule; with --resume, their saved states, the data position and the RNG states."""
    M.seed_everything(args.seed)
    init_from = str(Path(args.output_dir)) if resume_state else args.model_name_or_path
    # Under torchrun only rank 0 reads the weights; the others build a meta skeleton and receive
    # rank 0's weights when prepare_model shards the model (one CPU copy per node).
    policy = M.load_causal_lm(init_from, tokenizer, trust_remote_code=args.trust_remote_code,
                              stage_hint="" if args.resume else "the initial policy", meta=d.enabled and not d.is_main,
                              flag="--output_dir" if resume_state else "--model_name_or_path")
    M.print0(f"policy {args.model_name_or_path}: {plumbing.count_parameters(policy) / 1e6:.2f}M parameters, "
             f"vocab {len(tokenizer)}")
    bf16 = d.device.type == "cuda"
    M.check_max_length(policy, args.max_length, max(len(e["input_ids"]) for e in data.train + data.eval))
    policy = M.prepare_model(policy, d, trainable=True, bf16=bf16,
                             activation_checkpointing=args.gradient_checkpointing)
    policy.train()
    optimizer = plumbing.make_optimizer(policy, lr=args.lr, weight_decay=args.weight_decay,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scheduler = plumbing.make_scheduler(optimizer, args.lr_scheduler_type,
                                 warmup_steps=int(args.warmup_ratio * args.total_steps), total_steps=args.total_steps)
    step = 0
    if resume_state:
        trainer_state = resume_state["json"]["trainer"]
        plumbing.check_same_run(trainer_state, {"train_rows": len(data.train), "global_batch_size": args.global_batch_size,
                                         "total_steps": args.total_steps, "group_by_length": args.group_by_length})
        plumbing.load_optimizer_state(policy, optimizer, "optimizer", resume_state)
        scheduler.load_state_dict(trainer_state["scheduler"])
        plumbing.restore_rng_states(resume_state, d, args.seed, trainer_state["step"])
        step = trainer_state["step"]
        plumbing.check_not_finished(args.output_dir, step, args.total_steps)
        M.print0(f"resuming {Path(args.output_dir)} at step {step}/{args.total_steps}")
    else:
        M.seed_everything(args.seed + d.rank)  # per-rank seed for anything random from here on
    last_step = min(args.total_steps, args.stop_at_step) if args.stop_at_step else args.total_steps
    return Run(args, d, tokenizer, data, policy, optimizer, scheduler, step, last_step)


def open_output_folder(run: Run, resumed: bool) -> plumbing.JsonlLogger:
    """Write the run's arguments and data summary, and open metrics.jsonl (trimmed to the checkpoint
    with --resume; a fresh run replaces an older run's files)."""
    args, data, output_dir = run.args, run.data, Path(run.args.output_dir)
    logger = plumbing.JsonlLogger(output_dir / "metrics.jsonl", enabled=run.d.is_main)
    plumbing.write_run_files(args, run.step, data.summary, run.d.is_main)  # --overwrite: the old run aside until the first save
    M.print0(plumbing.recipe_line(args))
    M.print0(f"data: {len(data.train)} train rows ({data.train_truncated} truncated at {args.max_length} tokens), "
             f"{len(data.eval)} eval rows ({data.eval_truncated} truncated) | global batch {args.global_batch_size} | "
             f"{args.total_steps} steps")
    if not resumed:  # a resumed run's data are checked equal to the ones logged here
        logger.log({"step": run.step, "data/train_rows": len(data.train), "data/train_truncated": data.train_truncated,
                    "data/eval_rows": len(data.eval), "data/eval_truncated": data.eval_truncated})
    return logger


def final_evaluation(run: Run, logger: plumbing.JsonlLogger, root: Path | None) -> None:
    """The held-out loss and, on the toy world, the oracle's verdict on sampled responses -> eval.json,
    samples.jsonl."""
    args, d, output_dir = run.args, run.d, Path(run.args.output_dir)
    results = {"step": run.step}
    if run.data.eval:
        results.update(evaluate_loss(run.policy, run.data.eval, args, d, run.tokenizer.pad_token_id))
    samples = []
    if root is not None and args.toy_eval_samples > 0:
        toy, samples = evaluate_toy_world(run.policy, run.tokenizer, root, args, d)
        results.update(toy)
    if len(results) > 1:
        logger.log(results)
        M.print0("eval | " + plumbing.log_line(results))
        for s in samples[::max(1, len(samples) // 4)][:4]:  # a few samples, benign and harmful
            M.print0(f"  {s['prompt']!r} -> {s['response']!r} (safe {s['is_safe']}, h {s['helpfulness']:.2f})")
    if d.is_main:
        plumbing.write_json_atomic(output_dir / "eval.json", results)
        if samples:
            (output_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


# --------------------------------------------------------------------------------------------
# Main: setup, data, model, the loop, evaluation
# --------------------------------------------------------------------------------------------


def main(args: Args) -> None:
    # ---- distributed setup, the run folder -----------------------------------------------------
    d = M.init_distributed()
    if args.dataset == Args.dataset:  # the default data: create the toy world if missing (same files on every rank)
        import toyworld
        toyworld.ensure_toy_data(Path(args.dataset).parent)
    root = toy_root(args.dataset)
    # Claim the folder before reading anything: locked for this run, never another run's without
    # --overwrite, and with --resume the saved arguments must match (fails before anything is written).
    lock, resume_state = plumbing.open_run_folder(args, d.world_size, d.is_main)  # noqa: F841 - held to the end

    # ---- tokenizer and data (validated before the output folder is touched) -------------------
    tokenizer = M.load_tokenizer(tokenizer_path(args, root), "right", trust_remote_code=args.trust_remote_code)
    data = load_data(args, d, tokenizer)
    derive_sizes(args, d, len(data.train))

    # ---- model, optimiser, schedule (or the saved ones, with --resume) --------------------------
    run = start_training(args, d, tokenizer, data, resume_state)
    policy = run.policy

    # ---- the output folder: only now, after every input was validated --------------------------
    logger = open_output_folder(run, bool(resume_state))

    # ---- the loop: optimiser steps, each over gradient_accumulation_steps micro-batches --------
    b, world, accum = args.per_device_train_batch_size, d.world_size, args.gradient_accumulation_steps
    bar = plumbing.progress(total=run.last_step, initial=run.step, enabled=d.is_main, desc="sft")
    lengths = [len(e["input_ids"]) for e in data.train] if args.group_by_length else None
    t0 = time.time()
    meter = plumbing.Throughput(run.step, run.last_step)
    for global_batch in plumbing.global_batches(args, len(data.train), lengths, run.step, run.last_step):
        # ======== 1. the step's rows: token counts, this rank's micro-batches ======================
        # token counts (every rank knows every micro-batch: no communication): real tokens, and the
        # token positions computed (a micro-batch is right-padded to its longest row)
        lengths_mb = [[len(data.train[i]["input_ids"]) for i in global_batch[lo:lo + b]]
                      for lo in range(0, len(global_batch), b)]
        real_tokens, computed_tokens = sum(map(sum, lengths_mb)), sum(len(mb) * max(mb) for mb in lengths_mb)
        micro_batches = [M.collate_right([data.train[i] for i in global_batch[(m * world + d.rank) * b:(m * world + d.rank + 1) * b]],
                                 tokenizer.pad_token_id) for m in range(accum)]

        # ======== 2. forward and backward, micro-batch by micro-batch ==============================
        # Loss normalisation under accumulation: the target-token count of the whole optimiser step
        # (all micro-batches, all ranks), so the step's loss is sum(token NLL) / N_step. FSDP averages
        # gradients over ranks, hence the factor world_size (tests/dist_worker.py does the same).
        n_step = M.all_reduce(sum((labels[:, 1:] != M.IGNORE_INDEX).sum() for _, _, labels in micro_batches)
                              .float().to(d.device)).clamp(min=1)                # target tokens in the step
        step_loss = torch.zeros((), device=d.device)
        for input_ids, attention_mask, labels in micro_batches:
            input_ids, attention_mask, labels = input_ids.to(d.device), attention_mask.to(d.device), labels.to(d.device)
            with M.autocast(d):
                logprobs = M.policy_logprobs(policy, input_ids, attention_mask, right_padded=True)  # (B, L-1)
            loss_sum, _ = sft_loss_sum(logprobs.float(), labels)
            loss = loss_sum / n_step                                                 # this micro-batch's share
            (loss * world).backward()
            step_loss += loss.detach()

        # ======== 3. the optimiser step ============================================================
        grad_norm = plumbing.clip_grad_norm(policy, args.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        meter.add(tokens=real_tokens, sequences=len(global_batch))
        step_loss = M.all_reduce(step_loss)  # = sum over ranks of each rank's share = the step's token mean
        plumbing.check_finite(step_loss, "train/loss", run.step)

        # ======== 4. logging, evaluation, checkpoints ==============================================
        record = {"step": run.step, "epoch": run.step / args.steps_per_epoch, "train/loss": step_loss.item(),
                  "train/grad_norm": grad_norm.item(), "train/lr": run.scheduler.get_last_lr()[0],
                  "train/tokens": n_step.item(), "train/real_tokens": real_tokens,
                  "train/computed_tokens": computed_tokens, "memory/peak_gib": plumbing.peak_memory_gib(d.device),
                  "time": time.time() - t0}
        bar.update(1)
        bar.set_postfix(loss=f"{record['train/loss']:.3f}")
        if args.eval_every and run.step % args.eval_every == 0 and run.data.eval and run.step < args.total_steps:
            record.update(evaluate_loss(run.policy, run.data.eval, args, run.d, run.tokenizer.pad_token_id))
        plumbing.log_record(record, run.step, run.last_step, args.log_every, logger, bar, meter, run.d.is_main)
        if plumbing.save_due(args, run.step, run.last_step):  # the policy (a Hugging Face folder) and what --resume needs
            train_state = plumbing.trainer_state(args, run.d, run.policy, run.optimizer, run.scheduler, run.step,
                                                 len(run.data.train), final=run.step == args.total_steps)
            M.save_checkpoint(Path(args.output_dir), run.d, run.tokenizer, {"": run.policy}, train_state=train_state)
    bar.close()
    M.print0(f"trained: {meter.summary(run.step)}")
    if run.step < args.total_steps:
        M.print0(f"stopped at step {run.step}/{args.total_steps}; continue with --resume")
        return

    # ---- final evaluation on the held-out split (and, on the toy world, by the oracle) ---------
    final_evaluation(run, logger, root)
    M.print0(f"{'saved' if args.save else 'done (--no-save)'} {Path(args.output_dir)} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.split("\n")[0])))
    M.teardown_distributed()
