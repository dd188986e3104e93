"""Worker for the distributed tests: run as `torchrun --nproc_per_node N tests/dist_worker.py MODE OUT ARG`
or as a plain `python tests/dist_worker.py MODE OUT ARG` (one process, no process group).

init:     save a random-init tiny LLaMA to OUT/init (ARG: tokenizer folder).

step:     (ARG: the init checkpoint) one FSDP2 training step of a tiny LLaMA on a fixed global batch of 8 sequences; each rank
          takes its slice; the masked token loss is normalised by the token count of the whole
          global batch, so N ranks and 1 process optimise the same objective. Writes the loss and
          the saved checkpoint (atomic, gathered from the shards) to OUT.
generate: sampling where rows (and ranks) reach EOS at different steps, with the growing KV cache and again
          with the static one (model.sample(static_cache=True)) from the same seed; writes per-rank results.
rloo_step: (ARG: a policy checkpoint) one actor update of rloo_lagrangian.py on a fixed rollout of 2
          prompts x 4 answers with fixed reward and cost scores: each rank takes whole groups, computes
          their leave-one-out advantages and runs the stages' actor update (policy_run.actor_forward,
          ppo_lagrangian.actor_objective, policy_run.optimizer_step; plain SGD, no clip, so the
          update is the gradient itself; the old log-probs off by a per-token amount, so ratios vary and
          the loss is not the zero a group's advantages sum to); writes loss and checkpoint.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import plumbing


def global_batch(tokenizer):
    g = torch.Generator().manual_seed(123)
    rows = []
    for i in range(8):
        n = 4 + (i * 3) % 9
        rows.append(torch.randint(4, len(tokenizer), (n,), generator=g).tolist())
    L = max(map(len, rows))
    ids = torch.full((8, L), tokenizer.pad_token_id)
    mask = torch.zeros((8, L), dtype=torch.long)
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


def rloo_step(out: Path, init: str):
    import policy_run
    import ppo_lagrangian as P
    import rloo_lagrangian as R

    d = M.init_distributed("cpu")
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(init, "right")
    policy = M.prepare_model(M.load_causal_lm(init, tokenizer, meta=d.enabled and not d.is_main), d,
                             trainable=True, bf16=False)
    args = R.Args(actor_lr=1.0, threshold=0.0, max_grad_norm=1e9)
    opt = torch.optim.SGD(policy.parameters(), lr=args.actor_lr)
    sched = plumbing.make_scheduler(opt, "constant", 0, 10)
    ids, mask = global_batch(tokenizer)                                   # 8 rows: prompt 0 = rows 0-3, 1 = 4-7
    reward = torch.tensor([1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 2.0, 2.5])
    cost = torch.tensor([0.0, 1.0, -1.0, 2.0, 1.5, -0.5, 0.0, 1.0])
    per_rank = 8 // d.world_size
    sl = slice(d.rank * per_rank, (d.rank + 1) * per_rank)                # whole groups of 4 on each rank
    ids, mask, reward, cost = ids[sl], mask[sl], reward[sl], cost[sl]
    start = 2                                                             # "response" = tokens after the first 3
    with torch.no_grad():
        logp = M.policy_logprobs(policy, ids, mask)[:, start:]
    wiggle = 0.1 * torch.sin(torch.arange(8 * logp.shape[1], dtype=torch.float32)).view(8, -1)  # (8, T), global batch
    old = logp - wiggle[sl]                                               # ratios exp(wiggle) within the clip
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
        (out / "loss.json").write_text(json.dumps({"loss": global_loss.item()}))


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
    {"init": init, "step": step, "generate": generate, "rloo_step": rloo_step}[mode](out, tok)
    M.teardown_distributed()  # barrier, then destroy: a rank tearing gloo down early aborts the other
