"""Worker for the distributed tests: run as `torchrun --nproc_per_node N tests/dist_worker.py MODE OUT ARG`
or as a plain `python tests/dist_worker.py MODE OUT ARG` (one process, no process group).

init:     save a random-init tiny LLaMA to OUT/init (ARG: tokenizer folder).

step:     (ARG: the init checkpoint) one FSDP2 training step of a tiny LLaMA on a fixed global batch of 8 sequences; each rank
          takes its slice; the masked token loss is normalised by the token count of the whole
          global batch, so N ranks and 1 process optimise the same objective. Writes the loss and
          the saved checkpoint (atomic, written by every rank) to OUT.
generate: sampling where rows (and ranks) reach EOS at different steps, with the growing KV cache and again
          with the static one (model.sample(static_cache=True)) from the same seed; writes per-rank results.
rloo_step: (ARG: a policy checkpoint) one actor update of rloo_lagrangian.py on a fixed rollout of 8
          prompts x 4 answers with fixed reward and cost scores: each rank takes whole groups (8 prompts:
          1, 2, 4 or 8 ranks), computes their leave-one-out advantages and runs the stages' actor update
          (policy_run.actor_forward, ppo_lagrangian.actor_objective, policy_run.optimizer_step; plain SGD,
          no clip, so the update is the gradient itself; the old log-probs off by a per-token amount, so
          ratios vary and the loss is not the zero a group's advantages sum to); writes losses and checkpoint.
ppo_step: (ARG: init_uneven's OUT/init; its critics start from the sibling reward/ and cost/) one rl_step
          of ppo_lagrangian.py on a fixed rollout of 32 sequences as the sampler returns them (left-padded
          prompts, responses of 1-8 tokens) with fixed reward and cost scores: the dual step on lambda, the
          critics' old values, per-token rewards/costs, GAE and the combined advantage, then the actor and
          both critics updated with the stage's own functions (plain SGD, no clip); each rank its slice.
policy_steps: both, one after the other, in OUT/rloo_step and OUT/ppo_step (one launch, one import).
init_uneven: (ARG: tokenizer folder) save a tiny LLaMA whose shapes do not divide by 4 or 8 (FSDP2 then
          shards unevenly, some ranks hold nothing of a tensor) to OUT/init, and reward and cost models
          on it to OUT/reward, OUT/cost.
"""

import collections
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import plumbing


def global_batch(tokenizer, rows_n: int = 8):
    """rows_n right-padded rows of 4-12 random tokens (the first 8 the same whatever rows_n)."""
    g = torch.Generator().manual_seed(123)
    rows = []
    for i in range(rows_n):
        n = 4 + (i * 3) % 9
        rows.append(torch.randint(4, len(tokenizer), (n,), generator=g).tolist())
    L = max(map(len, rows))
    ids = torch.full((rows_n, L), tokenizer.pad_token_id)
    mask = torch.zeros((rows_n, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def step(out: Path, init: str):
    """init: a checkpoint folder; under torchrun only rank 0 reads it (the others build a meta
    skeleton and receive rank 0's weights when prepare_model shards the model)."""
    d = M.init_distributed("cpu")
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(init, "right")
    policy = M.load_causal_lm(init, tokenizer, meta=d.enabled and not d.is_main)
    policy = M.prepare_model(policy, d, trainable=True, bf16=False)
    optimizer = plumbing.make_optimizer(policy, lr=1e-2, weight_decay=0.1)
    ids, mask = global_batch(tokenizer)
    per_rank = 8 // d.world_size
    sl = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    ids, mask = ids[sl], mask[sl]
    logp = M.policy_logprobs(policy, ids, mask)                 # (b, L-1)
    token_mask = mask[:, 1:].float()
    n_tokens = M.all_reduce(token_mask.sum())               # tokens in the global batch
    # FSDP averages gradients over ranks, so scale by world_size to get sum / global count.
    loss = -(logp * token_mask).sum() / n_tokens * d.world_size
    loss.backward()
    plumbing.clip_grad_norm(policy, 1.0)
    optimizer.step()
    global_loss = M.all_reduce(loss.detach(), "mean")
    M.save_checkpoint(out / "ckpt", d, tokenizer, {"": policy})
    if d.is_main:
        (out / "loss.json").write_text(json.dumps({"loss": global_loss.item()}))


def ranks() -> M.Dist:
    """model.init_distributed, or the process group it set up already (policy_steps runs two modes)."""
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        return M.Dist(rank, int(os.environ["LOCAL_RANK"]), torch.distributed.get_world_size(), torch.device("cpu"))
    return M.init_distributed("cpu")


ROWS = 32  # the fixed rollouts' global batch: whole sequences (and groups of 4) on 1, 2, 4 or 8 ranks


def rank_slice(d: M.Dist) -> slice:
    """This rank's rows of the ROWS-row global batch (all of them in one process)."""
    per_rank = ROWS // d.world_size
    return slice(d.rank * per_rank, (d.rank + 1) * per_rank)


def fixed_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """The reward and cost model scores of the ROWS sequences, fixed (no reward model is run)."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(ROWS, generator=g) * 2.0, torch.randn(ROWS, generator=g)  # (ROWS,), (ROWS,)


def old_logprobs_off(logprobs: torch.Tensor, sl: slice) -> torch.Tensor:
    """The actor's own log-probs off by 0.1 sin(.) per token of the global batch: ratios exp(0.1 sin)
    inside the clip, different on every token, so the surrogate's gradient is not the first pass's."""
    wiggle = 0.1 * torch.sin(torch.arange(ROWS * logprobs.shape[1], dtype=torch.float32)).view(ROWS, -1)  # (ROWS, T)
    return logprobs - wiggle[sl]


def rloo_step(out: Path, init: str):
    import policy_run
    import ppo_lagrangian as P
    import rloo_lagrangian as R

    d = ranks()
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(init, "right")
    policy = M.prepare_model(M.load_causal_lm(init, tokenizer, meta=d.enabled and not d.is_main), d,
                             trainable=True, bf16=False)
    args = R.Args(actor_lr=1.0, threshold=0.0, max_grad_norm=1e9)
    opt = torch.optim.SGD(policy.parameters(), lr=args.actor_lr)
    sched = plumbing.make_scheduler(opt, "constant", 0, 10)
    ids, mask = global_batch(tokenizer, ROWS)                             # prompt p = rows 4p .. 4p + 3
    reward, cost = fixed_scores()
    sl = rank_slice(d)                                                    # whole groups of 4 on each rank
    ids, mask, reward, cost = ids[sl], mask[sl], reward[sl], cost[sl]
    start = 2                                                             # "response" = tokens after the first 3
    with torch.no_grad():
        old = old_logprobs_off(M.policy_logprobs(policy, ids, mask)[:, start:], sl)
    response_mask = mask[:, 1:][:, start:].float()
    rewards, costs = P.per_token_rewards_and_costs(reward, cost, old, old - 0.1, response_mask, 0.1, 50.0)
    g_r, g_c = R.sequence_returns(rewards, costs)
    advantage = P.combined_advantage(R.leave_one_out_advantages(g_r, 4), R.leave_one_out_advantages(g_c, 4), 0.5)
    run = policy_run.PolicyRun(args=args, d=d, stage="rloo_lagrangian", tokenizer=tokenizer, actor=policy,
                               trained={"actor": (policy, opt, sched)})
    rollout = policy_run.Rollout(epoch=0, prompts=[], sequences=ids, attention_mask=mask, S=start + 1)
    logprobs, ptx = policy_run.actor_forward(run, rollout, slice(None))
    loss, losses = P.actor_objective(logprobs, old, advantage[:, None].expand_as(response_mask), response_mask,
                                     args.clip_range_ratio, ptx)
    policy_run.optimizer_step(run, "actor", loss)
    global_loss = M.all_reduce(losses["actor"].detach(), "mean")
    M.save_checkpoint(out / "ckpt", d, tokenizer, {"": policy})
    if d.is_main:
        (out / "loss.json").write_text(json.dumps({"actor": global_loss.item()}))


def fixed_rollout(tokenizer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ROWS sequences laid out as model.sample returns them: prompts of 2-5 tokens left-padded to S = 5,
    then responses of 1-8 tokens right-padded (PAD, attention 0). Returns ids, attention mask (ROWS, S + 8), S."""
    g = torch.Generator().manual_seed(321)
    S, T = 5, 8
    ids = torch.full((ROWS, S + T), tokenizer.pad_token_id)
    mask = torch.zeros((ROWS, S + T), dtype=torch.long)
    for i in range(ROWS):
        p, r = 2 + i % 4, 1 + (i * 5) % T
        ids[i, S - p:S + r] = torch.randint(4, len(tokenizer), (p + r,), generator=g)
        mask[i, S - p:S + r] = 1
    return ids, mask, S


def ppo_step(out: Path, init: str):
    """One rl_step of ppo_lagrangian.main's loop (phases 2e-4c) on fixed_rollout, the critics starting
    from init's sibling reward/ and cost/ score models (as the stage's default)."""
    import policy_run
    import ppo_lagrangian as P

    d = ranks()
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(init, "right")
    meta = d.enabled and not d.is_main
    actor = M.prepare_model(M.load_causal_lm(init, tokenizer, meta=meta), d, trainable=True, bf16=False)
    critics = {f"{signal}_critic": M.prepare_model(M.load_score_model(str(Path(init).parent / signal), tokenizer,
                                                                       "critic", meta=meta), d, trainable=True, bf16=False)
               for signal in ("reward", "cost")}
    # SGD without a clip: each update is lr x the gradient, so a wrong scale anywhere shows
    args = P.Args(actor_lr=1.0, critic_lr=1.0, max_grad_norm=1e9, threshold=0.0, lambda_init=0.5, lambda_lr=0.1)
    run = policy_run.PolicyRun(args=args, d=d, stage="ppo_lagrangian", tokenizer=tokenizer, actor=actor)
    for name, model, lr in (("actor", actor, args.actor_lr), *((n, c, args.critic_lr) for n, c in critics.items())):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        run.trained[name] = (model, opt, plumbing.make_scheduler(opt, "constant", 0, 10))
    run.log_lambda = torch.nn.Parameter(torch.tensor(math.log(args.lambda_init)))   # as policy_run.start_run
    run.lambda_opt = torch.optim.SGD([run.log_lambda], lr=args.lambda_lr)
    ids, mask, S = fixed_rollout(tokenizer)
    reward, cost = fixed_scores()
    sl = rank_slice(d)
    ids, mask, reward, cost = ids[sl], mask[sl], reward[sl], cost[sl]
    rollout = policy_run.Rollout(epoch=0, prompts=[], sequences=ids, attention_mask=mask, S=S)
    start = S - 1
    response_mask = mask[:, 1:][:, start:].float()                          # (B, T), as score_responses
    with torch.no_grad():
        old_logprobs = old_logprobs_off(M.policy_logprobs(actor, ids, mask)[:, start:], sl)
        ref_logprobs = old_logprobs - 0.05 * torch.cos(old_logprobs)        # a KL that varies per token
        reward_values = critics["reward_critic"](ids, mask).scores[:, :-1][:, start:]   # (B, T) 2e
        cost_values = critics["cost_critic"](ids, mask).scores[:, :-1][:, start:]
    run.episode_costs = collections.deque(cost.tolist(), maxlen=args.episode_cost_window_size)
    # 3. per-token rewards/costs, advantages and returns
    rewards, costs = P.per_token_rewards_and_costs(reward, cost, old_logprobs, ref_logprobs, response_mask,
                                                   args.kl_coeff, args.clip_range_score)
    reward_advantages, reward_returns = P.gae(reward_values, rewards, response_mask, args.gamma, args.gae_lambda)
    cost_advantages, cost_returns = P.gae(cost_values, costs, response_mask, args.gamma, args.gae_lambda)
    # 4a. the dual step; 4b. the actor; 4c. the reward critic, then the cost critic (one micro-batch: the slice)
    lagrange_multiplier, _ = P.dual_step(run)
    advantages = P.combined_advantage(reward_advantages, cost_advantages, lagrange_multiplier)
    logprobs, ptx = policy_run.actor_forward(run, rollout, slice(None))
    loss, losses = P.actor_objective(logprobs, old_logprobs, advantages, response_mask, args.clip_range_ratio,
                                     ptx, args.ptx_coeff)
    policy_run.optimizer_step(run, "actor", loss)
    for name, old_values, returns in (("reward_critic", reward_values, reward_returns),
                                      ("cost_critic", cost_values, cost_returns)):
        values = critics[name](ids, mask).scores[:, :-1][:, start:]
        loss = P.critic_loss(values, old_values, returns, response_mask, args.clip_range_value)
        policy_run.optimizer_step(run, name, loss)
        losses[name] = loss.detach()
    record = {k: M.all_reduce(losses[k], "mean").item() for k in ("actor", "reward_critic", "cost_critic")}
    M.save_checkpoint(out / "ckpt", d, tokenizer, {"": actor, **critics})
    if d.is_main:
        (out / "loss.json").write_text(json.dumps({**record, "lambda": lagrange_multiplier}))


def policy_steps(out: Path, init: str):
    """rloo_step then ppo_step (OUT/rloo_step, OUT/ppo_step) in one launch: the ranks import torch and
    transformers once (most of a tiny launch's time on a CPU)."""
    for name, step_mode in (("rloo_step", rloo_step), ("ppo_step", ppo_step)):
        (out / name).mkdir(parents=True, exist_ok=True)
        step_mode(out / name, init)


UNEVEN = dict(hidden_size=30, num_attention_heads=3, num_key_value_heads=1, intermediate_size=90)


def init_uneven(out: Path, tok_dir: str):
    """A random-init tiny LLaMA no dimension of which divides by 4 or 8 but the head's: hidden 30 (3
    heads of 10, one key/value head: k_proj and v_proj have 10 rows), MLP 90, the vocabulary odd (the
    tokenizer's, plus one if even); the score models' head has 1 row. FSDP2 shards dim 0 in chunks of
    ceil(n / ranks): 30 rows on 4 ranks are 8, 8, 8, 6; 10 rows 3, 3, 3, 1; the score head's row is on
    rank 0 alone. Writes OUT/init (policy) and OUT/reward, OUT/cost (score models, fresh heads)."""
    from transformers import AutoModelForCausalLM

    d = M.Dist(0, 0, 1, torch.device("cpu"))
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(tok_dir, "right")
    policy = AutoModelForCausalLM.from_config(M.preset_config("toy-tiny", vocab_size=len(tokenizer) | 1, **UNEVEN))
    M.resize_embeddings(policy, tokenizer)                                    # the special ids into the config
    M.save_checkpoint(out / "init", d, tokenizer, {"": policy})
    for kind in ("reward", "cost"):
        M.save_checkpoint(out / kind, d, tokenizer, {"": M.load_score_model(str(out / "init"), tokenizer, kind)})


def saved_models(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A step's saved models, loaded as users load them (model.py's loaders, whatever files the folder
    holds): {"actor": state dict, and for ppo_step "reward_critic", "cost_critic"}."""
    tokenizer = M.load_tokenizer(ckpt, "right")
    models = {"actor": M.load_causal_lm(str(ckpt), tokenizer)}
    for name in ("reward_critic", "cost_critic"):
        if (ckpt / name).is_dir():
            models[name] = M.load_score_model(str(ckpt / name), tokenizer, "critic")
    return {name: {k: v.detach() for k, v in m.state_dict().items()} for name, m in models.items()}


def compare(one: Path, many: Path, starts: dict[str, Path]) -> dict:
    """The outputs of one process (one) and of N ranks (many) of a step mode, side by side. starts: the
    folder each model started from ({"actor": init, ...}). Per model: the largest update of one weight
    (largest_update), the largest difference between the two runs' weights (update_difference: the
    starting weights are the same) and their ratio (relative_difference); per logged loss (and lambda):
    both values and their relative difference.

    The tolerance the tests and tools/check_ranks.py state, 1e-5 relative for both: N ranks sum the same
    fp32 terms in another order (each rank its rows, then gloo's reduce-scatter of the gradients and the
    all-reduce of the losses) than one process (one sum over all rows): a few ulp of each gradient, ~1e-7
    relative; the stored weight adds its own rounding (one ulp of |w| < 2 is 1.2e-7, below 1e-6 of an
    update of 0.14 or more, what SGD at lr 1 gives here). An error of substance (rows counted twice or
    missed, a mean over the wrong count, another lambda) moves updates by 1e-2 or more."""
    a, b = saved_models(one / "ckpt"), saved_models(many / "ckpt")
    tokenizer = M.load_tokenizer(starts["actor"], "right")
    first = {"actor": M.load_causal_lm(str(starts["actor"]), tokenizer).state_dict()}
    for name in ("reward_critic", "cost_critic"):
        if name in a:
            first[name] = M.load_score_model(str(starts[name]), tokenizer, "critic").state_dict()
    report = {}
    for name in a:
        assert a[name].keys() == b[name].keys() == first[name].keys(), name
        largest = max((a[name][k] - first[name][k]).abs().max().item() for k in a[name])
        difference = max((a[name][k] - b[name][k]).abs().max().item() for k in a[name])
        report[name] = {"largest_update": largest, "update_difference": difference,
                        "relative_difference": difference / largest}
    la, lb = (json.loads((x / "loss.json").read_text()) for x in (one, many))
    for k in la:
        report[f"loss {k}"] = {"one": la[k], "many": lb[k], "relative_difference": abs(la[k] - lb[k]) / abs(la[k])}
    return report


def init(out: Path, tok_dir: str):
    """Save a random-init tiny policy as the common starting checkpoint."""
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(tok_dir, "right")
    M.save_checkpoint(out / "init", M.init_distributed("cpu"), tokenizer, {"": M.load_causal_lm("toy-tiny", tokenizer)})


def generate(out: Path, tok_dir: str):
    d = M.init_distributed("cpu")
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(tok_dir, "left")
    policy = M.load_causal_lm("toy-tiny", tokenizer)
    torch.nn.init.zeros_(policy.lm_head.weight)    # uniform next-token distribution: EOS at random steps
    policy = M.prepare_model(policy, d, trainable=True, bf16=False)
    enc = tokenizer(["how do i bake bread", "fix a bike"], return_tensors="pt", padding=True)
    runs = []
    for static_cache in (False, True):             # the growing cache, then the static one from the same seed
        M.seed_everything(1000 + d.rank)           # per-rank sampling seed
        with M.gathered_weights(policy):
            runs.append(M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=400,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 static_cache=static_cache))
    (seqs, mask), (static_seqs, static_mask) = runs
    S = enc.input_ids.shape[1]
    lengths = mask[:, S:].sum(1).tolist()
    ended = (seqs[:, S:] == tokenizer.eos_token_id) | (seqs[:, S:] == tokenizer.pad_token_id)  # EOS, or a sampled PAD
    (out / f"gen_rank{d.rank}.json").write_text(json.dumps({
        "columns": seqs.shape[1], "lengths": lengths, "finished": bool(ended.any(1).all()),
        "static_equal": torch.equal(static_seqs, seqs) and torch.equal(static_mask, mask)}))


if __name__ == "__main__":
    mode, out, tok = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    {"init": init, "step": step, "generate": generate, "rloo_step": rloo_step, "ppo_step": ppo_step,
     "policy_steps": policy_steps, "init_uneven": init_uneven}[mode](out, tok)
    M.teardown_distributed()  # barrier, destroy, os._exit: see plumbing.exit_now
