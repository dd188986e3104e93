"""policy_run.py: the run machinery the two policy stages share (ppo_lagrangian.py, rloo_lagrangian.py).

Loading the data (the unique prompts, the optional PTX rows) and the models every policy stage holds
(the trained actor, the frozen reference, the frozen reward and cost models); the rollout (sampling
from the actor) and its scoring with the reward and cost models and the old and reference log-probs;
the actor's forward and every trained model's optimiser step; the per-step diagnostics, log lines and
sample tables; the resumable checkpoint and the resume. None of it is the algorithm: the equations
(the per-token streams, GAE, the leave-one-out baseline, the losses, the dual step on lambda) live in
the stage files, which call these phases in their loops in the order they happen. A teacher reads
the stage files and may skip this one.

The state a run carries from phase to phase is one object, PolicyRun (what was set up: the flags,
the ranks, the tokenizer, the data, the models and their optimisers, log(lambda) and its episode-cost
window, the loggers, the position in the run); a rollout's tensors travel as a Rollout. `args` is the
stage's Args (ppo_lagrangian.PolicyArgs or a subclass; no stage is imported here).

Shape letters as in the stage files: B sequences per rank, b per micro-batch, S padded prompt length,
L = S + generated length, T = L - S response positions.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import data_rules
import model as M
import plumbing
from plumbing import UserError

HINT = {"sft": "run sft.py first", "reward": "run reward.py first", "cost": "run cost.py first"}

# --------------------------------------------------------------------------------------------
# The state: one run, one rollout
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyRun:
    """What a policy stage set up, handed from phase to phase. Filled in the order of the stage's
    main: open_run (the folder, tokenizer, data), load_models and prepare_models (the models),
    add_optimizer (one per trained model), start_run (lambda, the resume, the logs); `step` counts rl_steps."""
    args: Any                      # the stage's Args (ppo_lagrangian.PolicyArgs or a subclass)
    d: M.Dist                      # the ranks (model.init_distributed)
    stage: str                     # "ppo_lagrangian" or "rloo_lagrangian": which stage writes (and may resume) the folder
    lock: Any = None               # the run folder's lock, held to the end of the run
    state: dict | None = None      # the saved train state with --resume, else None
    derivation: str | None = None  # how the threshold was derived (None: --threshold was given)
    # data
    tokenizer: Any = None
    prompts: list[str] = field(default_factory=list)  # the unique prompts of --dataset
    ptx_examples: list[dict] | None = None            # the PTX rows, tokenised (None without --ptx_dataset)
    data_summary: dict = field(default_factory=dict)
    rollouts_per_epoch: int = 0
    total_rollouts: int = 0
    # models: the actor (trained) and the frozen three; trained: {name: (model, optimizer, scheduler)}
    actor: Any = None
    reference: Any = None
    reward_model: Any = None
    cost_model: Any = None
    trained: dict = field(default_factory=dict)
    # the Lagrange multiplier: log(lambda), its SGD optimiser, this rank's window of raw episode costs
    log_lambda: torch.Tensor | None = None
    lambda_opt: Any = None
    episode_costs: collections.deque | None = None
    # the position in the run and its logs
    step: int = 0
    position: dict = field(default_factory=dict)  # {"epoch", "rollout_in_epoch"}: see rollout_batches
    logger: Any = None
    samples_log: Any = None
    bar: Any = None
    meter: Any = None

    @property
    def load_options(self) -> dict:
        """model.py's loading options: fp32 weights; only rank 0 reads the checkpoints, the other ranks
        build meta skeletons and receive the weights when prepare_model shards them (one CPU copy per
        node instead of one per rank)."""
        return dict(dtype=torch.float32, trust_remote_code=self.args.trust_remote_code,
                    meta=self.d.enabled and not self.d.is_main)

    @property
    def bf16(self) -> bool:
        """bf16 frozen models and compute on GPU (model.prepare_model); fp32 on CPU."""
        return self.d.device.type == "cuda"


@dataclass
class Rollout:
    """One rollout on this rank: B sequences (a prompt's samples next to each other), the scores and
    streams the stage records about them (for its updates and the diagnostics), and the phases' times."""
    epoch: int
    prompts: list[str]             # the prompt of each sequence (B,)
    sequences: torch.Tensor        # (B, L) left-padded prompt + response
    attention_mask: torch.Tensor   # (B, L) built once, in sampling
    S: int                         # padded prompt length: the response starts at column S
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # score_responses's, plus the stage's streams
    timer: dict[str, float] = field(default_factory=lambda: {"generation": 0.0, "scoring": 0.0, "training": 0.0})


# --------------------------------------------------------------------------------------------
# Data: unique prompts, left-padded for generation; the optional PTX rows
# --------------------------------------------------------------------------------------------


def load_prompts(args, summary: data_rules.DataSummary) -> list[str]:
    """The unique non-empty prompts of --dataset. Repeats are dropped keeping the last occurrence's
    position, as the official PromptOnlyDataset (safe_rlhf/datasets/prompt_only.py@82743cc:L45-80);
    empty prompts and the repeats are counted in `summary`."""
    if args.dataset == "data/toy/prompts":
        import toyworld
        toyworld.ensure_toy_data("data/toy")
    rows = data_rules.load_rows(args.dataset, args.split, revision=args.revision, limit=args.limit,
                              required=(args.prompt_field,), text=(args.prompt_field,))
    summary.read = len(rows)
    last = {row[args.prompt_field]: i for i, row in enumerate(rows) if row[args.prompt_field].strip()}
    for i, row in enumerate(rows):
        if not row[args.prompt_field].strip():
            summary.drop("empty prompt", i)
        elif last[row[args.prompt_field]] != i:
            summary.drop("duplicate", i)
    return [p for p, _ in sorted(last.items(), key=lambda kv: kv[1])]


def load_ptx(args, tokenizer, summaries: dict) -> list[dict] | None:
    """The PTX rows (alpaca schema), read and tokenised once as sft.py reads its data (sft.load_examples,
    no de-duplication); None without --ptx_dataset ("" or none: no PTX, which --recipe paper otherwise
    sets). Unusable rows are dropped and counted in summaries["ptx"]."""
    if not args.ptx_dataset or args.ptx_dataset.lower() == "none":
        return None
    import sft  # the SFT data loader (only needed with PTX)
    summaries["ptx"] = data_rules.DataSummary("--ptx_dataset", args.ptx_dataset, "train")
    examples, _ = sft.load_examples(args.ptx_dataset, "train", tokenizer, max_length=args.max_length,
                                    flag="--ptx_dataset", summary=summaries["ptx"])
    return examples


# --------------------------------------------------------------------------------------------
# Set-up, in the order a stage's main calls it
# --------------------------------------------------------------------------------------------


def check_args(args, d: M.Dist, sequences_per_prompt: int = 1) -> None:
    """The checks and derived sizes of a policy stage, before anything is read or written (the stage
    derives its threshold right after, before the run folder compares the saved arguments)."""
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
    if not args.reward_shaping and args.lambda_max is not None and args.lambda_init > args.lambda_max:
        M.print0(f"warning: --lambda_init {args.lambda_init:g} is above --lambda_max {args.lambda_max:g}: lambda is "
                 "capped there from the first rl_step, as the official code does (ppo_lagrangian.dual_step)")
    args.steps_per_rollout = args.update_iters * sequences // args.per_device_train_batch_size


def open_run(args, d: M.Dist, stage: str, derivation: str | None = None) -> PolicyRun:
    """Claim the run folder before reading anything (locked for this run, never another run's without
    --overwrite, and with --resume the saved arguments must match and `stage` must have written them:
    fails before anything is written), then read the tokenizer, the unique prompts and the PTX rows,
    validated before anything is written, and size the run (sets args.total_steps)."""
    lock, state = plumbing.open_run_folder(args, d.world_size, d.is_main, stage)
    actor_path = args.output_dir if args.resume else args.actor_model_name_or_path
    tokenizer = M.load_tokenizer(args.tokenizer_name_or_path or actor_path, "left", args.trust_remote_code)
    summaries = {"train": data_rules.DataSummary("--dataset", args.dataset, args.split)}
    prompts = load_prompts(args, summaries["train"])
    # a prompt longer than max_length // 2 tokens keeps its last ones (M.encode_prompts): counted, not dropped
    summaries["train"].stats["truncated_prompts"] = sum(  # (no prompt at all: report_data refuses below)
        len(ids) > args.max_length // 2 for ids in (tokenizer([M.format_prompt(p) for p in prompts])["input_ids"] if prompts else []))
    ptx_examples = load_ptx(args, tokenizer, summaries)
    data_summary = data_rules.report_data(summaries, args.strict, d.is_main)
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
    return PolicyRun(args=args, d=d, stage=stage, lock=lock, state=state, derivation=derivation, tokenizer=tokenizer,
                     prompts=prompts, ptx_examples=ptx_examples, data_summary=data_summary,
                     rollouts_per_epoch=rollouts_per_epoch, total_rollouts=total_rollouts)


def load_models(run: PolicyRun) -> None:
    """The four models every policy stage holds, unprepared (run.actor, .reference, .reward_model,
    .cost_model): the actor (from --output_dir on resume), the frozen reference (the SFT policy) and the
    frozen reward and cost models. Each model must be the kind its slot takes (a cost model as the
    reward model is refused, not trained on), and the frozen scorers must share the actor's tokenizer."""
    args, tokenizer, load = run.args, run.tokenizer, run.load_options
    M.seed_everything(args.seed)  # same on every rank: identical initial weights
    actor = M.load_causal_lm(args.output_dir if args.resume else args.actor_model_name_or_path, tokenizer,
                             stage_hint=HINT["sft"], flag="--output_dir" if args.resume else "--actor_model_name_or_path",
                             **load)
    M.check_max_length(actor, args.max_length)
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
    run.actor, run.reference, run.reward_model, run.cost_model = actor, reference, reward_model, cost_model


def prepare_models(run: PolicyRun, also_trained: dict | None = None) -> dict:
    """Shard and materialise (model.prepare_model) the actor and the stage's other trained models
    (also_trained: {name: model}, e.g. the critics), then the frozen reference, reward and cost models.
    Returns also_trained's models, prepared."""
    prep = dict(bf16=run.bf16, activation_checkpointing=run.args.gradient_checkpointing)
    run.actor = M.prepare_model(run.actor, run.d, trainable=True, **prep)
    prepared = {name: M.prepare_model(model, run.d, trainable=True, **prep) for name, model in (also_trained or {}).items()}
    run.reference = M.prepare_model(run.reference, run.d, trainable=False, bf16=run.bf16)
    run.reward_model = M.prepare_model(run.reward_model, run.d, trainable=False, bf16=run.bf16)
    run.cost_model = M.prepare_model(run.cost_model, run.d, trainable=False, bf16=run.bf16)
    return prepared


def add_optimizer(run: PolicyRun, name: str, model, lr: float, weight_decay: float, scheduler: str) -> None:
    """AdamW (the run's betas and epsilon) and its learning-rate schedule (warmup: --actor_warmup_ratio of
    the run, for every trained model) for a trained model, kept in run.trained[name]."""
    args = run.args
    opt = plumbing.make_optimizer(model, lr, weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    sched = plumbing.make_scheduler(opt, scheduler, int(args.actor_warmup_ratio * args.total_steps), args.total_steps)
    run.trained[name] = (model, opt, sched)


def start_run(run: PolicyRun, desc: str) -> None:
    """log(lambda) as a parameter, its SGD optimiser and this rank's window of raw episode costs; then a
    fresh run seeds sampling per rank, and --resume restores what save_run wrote on this rank
    (plumbing.open_run_folder has checked that this stage wrote it): every trained model's optimiser and
    scheduler, log(lambda), the episode-cost window, the RNG states and the loop position. Then the
    logs (open_logs), the recipe and threshold lines, the progress bar and the throughput meter."""
    args, d, state = run.args, run.d, run.state
    run.log_lambda = torch.nn.Parameter(torch.tensor(math.log(args.lambda_init) if args.lambda_init > 0 else -math.inf,
                                                     device=d.device))
    run.lambda_opt = torch.optim.SGD([run.log_lambda], lr=args.lambda_lr)
    run.episode_costs = collections.deque(maxlen=args.episode_cost_window_size)
    if state is None:
        M.seed_everything(args.seed + d.rank)  # per rank: different samples on every rank
        run.step, run.position = 0, {"epoch": 0, "rollout_in_epoch": 0}
    else:
        for name, (model, opt, sched) in run.trained.items():
            plumbing.load_optimizer_state(model, opt, name, state)
            sched.load_state_dict(state["json"][f"{name}.scheduler"])
        with torch.no_grad():
            run.log_lambda.copy_(state["tensors"]["log_lambda"])
        run.episode_costs.extend(episode_cost_window(state["json"]["episode_costs"], d))
        plumbing.restore_rng_states(state, d, args.seed, state['json']['step'])
        M.print0(f"resumed from {args.output_dir} at rl_step {state['json']['step']}")
        run.step = state["json"]["step"]
        run.position = {"epoch": state["json"]["epoch"], "rollout_in_epoch": state["json"]["rollout_in_epoch"]}
        plumbing.check_not_finished(args.output_dir, run.step, args.total_steps)
    run.logger, run.samples_log = open_logs(run)
    M.print0(plumbing.recipe_line(args))
    M.print0(args.kl_coeff_line())
    M.print0(run.derivation or f"threshold {args.threshold:+.3f} (--threshold)")
    run.bar = plumbing.progress(total=args.total_steps, initial=run.step, enabled=d.is_main, desc=desc)
    run.meter = plumbing.Throughput(run.step, args.total_steps)


def episode_cost_window(saved: list[list[float]], d: M.Dist) -> list[float]:
    """This rank's share of the saved episode-cost windows (one per rank that saved them): its own on
    the same number of ranks; on another number, the windows pooled and dealt out in turn (rank r takes
    every W-th cost from the r-th), so the costs J_C is measured from stay the same ones."""
    if len(saved) == d.world_size:
        return saved[d.rank]
    return [c for window in saved for c in window][d.rank::d.world_size]


def open_logs(run: PolicyRun) -> tuple:
    """The run folder's logs: a fresh run (--overwrite) replaces an older one's, a resumed run drops what
    the killed run logged past its checkpoint; args.json and data_summary.json. Returns the two loggers."""
    args, is_main = run.args, run.d.is_main
    out = Path(args.output_dir)
    plumbing.write_run_files(args, run.step, run.data_summary, is_main)  # --overwrite: the old run aside until the first save
    return plumbing.JsonlLogger(out / "metrics.jsonl", is_main), plumbing.JsonlLogger(out / "samples.jsonl", is_main)


# --------------------------------------------------------------------------------------------
# The loop's phases, in the order the stages' loops call them
# --------------------------------------------------------------------------------------------


def rollout_batches(run: PolicyRun):
    """The loop over rollouts: yields (epoch, this rank's prompts) for every rollout left. The order is
    shuffled per epoch with the same seed on every rank, and each rank takes its slice of a global
    batch. run.position {"epoch", "rollout_in_epoch"} counts a rollout as done when it is handed out
    (what a save at its end records), so a resumed run continues with the next one."""
    args, d, prompts, position = run.args, run.d, run.prompts, run.position
    global_prompt_batch = args.per_device_prompt_batch_size * d.world_size
    while position["epoch"] * run.rollouts_per_epoch + position["rollout_in_epoch"] < run.total_rollouts:
        epoch = position["epoch"]
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
        while position["rollout_in_epoch"] < run.rollouts_per_epoch and \
                epoch * run.rollouts_per_epoch + position["rollout_in_epoch"] < run.total_rollouts:
            first = position["rollout_in_epoch"] * global_prompt_batch + d.rank * args.per_device_prompt_batch_size
            position["rollout_in_epoch"] += 1
            yield epoch, [prompts[i] for i in order[first:first + args.per_device_prompt_batch_size]]
        if position["rollout_in_epoch"] >= run.rollouts_per_epoch:
            position["epoch"], position["rollout_in_epoch"] = epoch + 1, 0


def generate_responses(run: PolicyRun, epoch: int, batch_prompts: list[str], samples_per_prompt: int = 1) -> Rollout:
    """Rollout: sample a response to each prompt (each prompt samples_per_prompt times, the copies next
    to each other) from the actor, exactly: temperature only, no top-k. Template + left padding; prompts
    keep their last max_length // 2 tokens, and every rank pads to the longest prompt on ANY rank: the
    same S, so the same generation budget. A sampled UNK is a hole in the response, as the official rollout
    mask makes it (M.sample); a sampled PAD ends it. Returns the Rollout: sequences, attention_mask (B, L) and S."""
    args, d, tokenizer = run.args, run.d, run.tokenizer
    rows = M.encode_prompts(tokenizer, batch_prompts, args.max_length // 2)
    rows = [row for row in rows for _ in range(samples_per_prompt)]          # prompt i at rows i*K ... i*K+K-1
    S = int(M.all_reduce(torch.tensor(max(map(len, rows)), device=d.device), "max").item())  # NCCL: on the GPU
    prompt_ids, prompt_mask = (t.to(d.device) for t in M.left_pad(rows, tokenizer.pad_token_id, length=S))
    # all-gather the actor once for the whole generation; bf16 compute on a single GPU (M.autocast)
    with M.gathered_weights(run.actor), M.autocast(d):
        sequences, attention_mask = M.sample(
            run.actor, prompt_ids, prompt_mask, max_new_tokens=max(1, args.max_length - S),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            unk_token_id=tokenizer.unk_token_id, temperature=args.temperature)  # (B, L), (B, L): masks built once, here
    return Rollout(epoch=epoch, prompts=[p for p in batch_prompts for _ in range(samples_per_prompt)],
                   sequences=sequences, attention_mask=attention_mask, S=S)


@torch.no_grad()
def score_responses(run: PolicyRun, rollout: Rollout) -> dict[str, torch.Tensor]:
    """Score the rollout and record the old policy (no grad), response positions only (T = L - S):
    reward, cost, has_eos (B,); old_logprobs, ref_logprobs, mask (B, T). Kept in rollout.scores too."""
    args, d, sequences, attention_mask, S = run.args, run.d, rollout.sequences, rollout.attention_mask, rollout.S
    with M.autocast(d):
        # a. EOS truncation happened in sampling (PAD after EOS, mask 0 there).
        has_eos = (sequences[:, S:] == run.tokenizer.eos_token_id).any(dim=1)        # (B,)
        # b. reward and cost read at the last real token (the EOS, or the last token at max_length)
        reward = run.reward_model(sequences, attention_mask).end_scores               # (B,)
        cost = run.cost_model(sequences, attention_mask).end_scores                   # (B,)
        # c. optional penalty for a missing EOS (0 by default, as the official code)
        reward = reward - args.missing_eos_penalty * (~has_eos).float()
        cost = cost + args.missing_eos_penalty * (~has_eos).float()
        # d. log-probs of the rollout policy and of the reference (temperature included)
        old_logprobs = M.policy_logprobs(run.actor, sequences, attention_mask, args.temperature)      # (B, L-1)
        ref_logprobs = M.policy_logprobs(run.reference, sequences, attention_mask, args.temperature)  # (B, L-1)
    start = S - 1                                        # logp[:, start] is the first generated token
    rollout.scores.update(reward=reward, cost=cost, has_eos=has_eos, old_logprobs=old_logprobs[:, start:],
                          ref_logprobs=ref_logprobs[:, start:], mask=attention_mask[:, 1:][:, start:].float())  # (B, T)
    return rollout.scores


def actor_forward(run: PolicyRun, rollout: Rollout, sl: slice) -> tuple[torch.Tensor, tuple | None]:
    """The actor's forward on a micro-batch, with grad: the log-probs of its responses (b, T), and with
    --ptx_dataset PTX's log-probs (b, L'-1) and labels (b, L') on b PTX rows drawn for this rl_step and
    rank (None without PTX). The stage turns them into its loss (ppo_lagrangian.actor_objective)."""
    args, d = run.args, run.d
    with M.autocast(d):
        logprobs = M.policy_logprobs(run.actor, rollout.sequences[sl], rollout.attention_mask[sl],
                                     args.temperature)[:, rollout.S - 1:]       # (b, T)
    if run.ptx_examples is None:
        return logprobs, None
    b = logprobs.shape[0]
    g = torch.Generator().manual_seed(args.seed * 7919 + run.step * d.world_size + d.rank)
    picks = torch.randint(len(run.ptx_examples), (b,), generator=g).tolist()
    ids, am_ptx, labels = (t.to(d.device) for t in M.collate_right([run.ptx_examples[i] for i in picks],
                                                                    run.tokenizer.pad_token_id))
    with M.autocast(d):
        ptx_logprobs = M.policy_logprobs(run.actor, ids, am_ptx, right_padded=True)    # (b, L'-1)
    return logprobs, (ptx_logprobs, labels)


def optimizer_step(run: PolicyRun, name: str, loss: torch.Tensor) -> None:
    """One optimiser step of the trained model run.trained[name] on `loss`: backward, the global
    gradient-norm clip (--max_grad_norm), AdamW and its scheduler."""
    model, opt, sched = run.trained[name]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    plumbing.clip_grad_norm(model, run.args.max_grad_norm)
    opt.step()
    sched.step()


def end_of_rollout(run: PolicyRun) -> bool:
    """After a rollout's updates: a resumable checkpoint when one is due, and whether to stop here
    (--stop_at_step: only at a rollout boundary, so a resumed run continues with the next rollout)."""
    args = run.args
    stop = args.stop_at_step is not None and run.step >= args.stop_at_step
    if args.save and not stop and checkpoint_due(args, run.step):
        save_run(run)
    return stop


def checkpoint_due(args, step: int) -> bool:
    """A resumable checkpoint at the end of the rollout in which rl_step crossed a multiple of
    --save_every (0: none until the end of the run, which saves anyway)."""
    return bool(args.save_every) and step % args.save_every < args.steps_per_rollout and step < args.total_steps


def save_run(run: PolicyRun) -> None:
    """A resumable checkpoint: every trained model (the actor at the folder's root, the others in
    subfolders), their optimiser and scheduler states, every rank's RNG and episode-cost window,
    log(lambda), the loop position, and which stage wrote it.
    The per-rank lambdas are gathered too (they must all be equal: checked by the tests)."""
    d, log_lambda, episode_costs = run.d, run.log_lambda, run.episode_costs
    per_rank = [(list(episode_costs), log_lambda.item())] * d.world_size
    if d.enabled:
        torch.distributed.all_gather_object(per_rank, (list(episode_costs), log_lambda.item()))
    state = plumbing.merge_states(
        *(plumbing.optimizer_state(model, opt, name) for name, (model, opt, _) in run.trained.items()),
        plumbing.gather_rng_states(d),
        {"tensors": {"log_lambda": log_lambda.detach().cpu().reshape(())},
         "json": {**{f"{name}.scheduler": sched.state_dict() for name, (_, _, sched) in run.trained.items()},
                  "episode_costs": [c for c, _ in per_rank], **run.position, "step": run.step, "stage": run.stage,
                  "log_lambda_per_rank": [l for _, l in per_rank]}})
    M.save_checkpoint(run.args.output_dir, d, run.tokenizer,
                      {"" if name == "actor" else name: model for name, (model, _, _) in run.trained.items()},
                      train_state=state)


def finish_run(run: PolicyRun) -> None:
    """After the loop: close the progress bar, the run's throughput, and (unless --no-save) the final
    checkpoint, which is also what resumes and what people load."""
    run.bar.close()
    M.print0(f"trained: {run.meter.summary(run.step)}")
    if run.args.save:
        save_run(run)
        out = Path(run.args.output_dir)
        critics = [f"{out}/{name}" for name in run.trained if name != "actor"]
        M.print0(f"saved the actor to {out}" + (f" (critics in {', '.join(critics)})" if critics else ""))


# --------------------------------------------------------------------------------------------
# Diagnostics: the metrics of one rl_step (their names are explained in docs/metrics.md)
# --------------------------------------------------------------------------------------------


def log_step(run: PolicyRun, rollout: Rollout, sl: slice, losses: dict[str, torch.Tensor], first_pass: bool,
             lagrange_multiplier: float, episode_cost: float) -> None:
    """The end of an rl_step on micro-batch `sl` of the rollout: the progress bar and the throughput
    meter, the metrics record (step_record, plus the learning rates, peak memory and the phases' times),
    a log line every --log_every rl_steps (with throughput and ETA), and every --sample_every rl_steps
    the micro-batch's first four answers."""
    args, step, micro = run.args, run.step, {k: v[sl] for k, v in rollout.scores.items()}
    run.bar.update(1)
    run.meter.add(tokens=M.all_reduce(rollout.attention_mask[sl].sum().float()).item(),
                  sequences=args.per_device_train_batch_size * run.d.world_size, rl_steps=1)
    record = step_record(step, rollout.epoch, micro, losses, first_pass, lagrange_multiplier, episode_cost,
                         args.threshold)
    critics = [name for name in run.trained if name != "actor"]   # the critics share one schedule
    record.update({"lr/actor": run.trained["actor"][2].get_last_lr()[0],
                   **({"lr/critic": run.trained[critics[0]][2].get_last_lr()[0]} if critics else {}),
                   "memory/peak_gib": plumbing.peak_memory_gib(run.d.device),
                   **{f"time/{k}": v for k, v in rollout.timer.items()}})
    run.bar.set_postfix(R=f"{record['objective/reward']:.2f}", C=f"{record['objective/cost']:.2f}",
                        lam=f"{record['lagrangian/lambda']:.2f}", kl=f"{record['objective/kl']:.2f}")
    if step % args.log_every == 0 or step == args.total_steps:
        record.update(run.meter.rates(step))
        M.print0(step_line(record))
    run.logger.log(record)
    if args.sample_every and step % args.sample_every == 0:
        texts = run.tokenizer.batch_decode(rollout.sequences[sl][:4, rollout.S:], skip_special_tokens=True)
        prompts = rollout.prompts[sl][:4]
        for p, r, rw, c in zip(prompts, texts, micro["reward"].tolist(), micro["cost"].tolist()):
            run.samples_log.log({"step": step, "prompt": p, "response": r, "reward": rw, "cost": c})
            M.print0(f"  [{rw:+.2f} R | {c:+.2f} C] {p} -> {r[:100]}")


@torch.no_grad()
def step_record(step: int, epoch: int, micro: dict[str, torch.Tensor], losses: dict[str, torch.Tensor],
                first_pass: bool, lagrange_multiplier: float, episode_cost: float, threshold: float) -> dict:
    """The record of one rl_step, every statistic averaged over ranks (one all-reduce).
    micro: this micro-batch's reward, cost, has_eos (b,) and old_logprobs, ref_logprobs, rewards,
    costs, reward_advantages, cost_advantages, mask (b, T). losses: the stage's actor losses (the actor's
    loss, its clip fraction and max |log ratio|, PTX's loss; ppo_lagrangian.actor_objective) plus the
    critics' losses, each logged as loss/<name>. first_pass: the rollout's first micro-batch, before any
    update from it, where the max |log ratio| must be 0 (logged as policy/first_pass_logratio_max on
    those rl_steps only)."""
    m = micro["mask"]
    per_sequence = lambda x: (x * m).sum(1).mean()  # noqa: E731  summed over the response, mean over sequences
    stats = {
        "objective/reward": micro["reward"].mean(), "objective/cost": micro["cost"].mean(),
        "objective/kl": per_sequence(micro["old_logprobs"] - micro["ref_logprobs"]),
        "objective/reward_with_kl_penalty": per_sequence(micro["rewards"]),
        "objective/cost_with_kl_penalty": per_sequence(micro["costs"]),
        # per-sequence token mean, then over the batch: the official train/*_advantage (its masked_mean)
        "policy/reward_advantage_mean": M.masked_sequence_mean(micro["reward_advantages"], m),
        "policy/cost_advantage_mean": M.masked_sequence_mean(micro["cost_advantages"], m),
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
