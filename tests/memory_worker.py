"""Worker for tests/test_memory_plan.py: `torchrun --nproc_per_node 2 tests/memory_worker.py OUT TOKENIZER`.

Builds PPO-Lagrangian's six models from the toy-tiny preset as ppo_lagrangian.py does (meta skeletons on
ranks > 0, model.prepare_model, model.make_optimizer; fp32 on CPU), takes one optimiser step of each
trained model, runs one no-grad forward of each frozen model, and writes rank 0's bytes to OUT/rank0.json:
the storages behind the local shards of parameters, gradients and AdamW states, and the frozen models'
parameters that are still unsharded after their forward (FSDP2 does not reshard a root after a forward
without backward).

(The save on 2 ranks is checked by hand, `torchrun --nproc_per_node 2 -m tools.memory_plan --measure`:
a whole small ppo_lagrangian.py run, too slow for the suite; docs/bench.md gives its figures.)
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import memory_plan as MP  # noqa: E402
import model as M  # noqa: E402
import plumbing


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor's local shard; padding included)."""
    storages = {}
    for t in tensors:
        st = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def main(out: Path, tok_dir: str) -> None:
    d = M.init_distributed("cpu")
    M.seed_everything(0)
    tokenizer = M.load_tokenizer(tok_dir, "left")
    meta = d.enabled and not d.is_main
    models = {"actor": M.load_causal_lm("toy-tiny", tokenizer, meta=meta),
              "reference": M.load_causal_lm("toy-tiny", tokenizer, meta=meta),
              "reward_model": M.load_score_model("toy-tiny", tokenizer, "reward", meta=meta),
              "cost_model": M.load_score_model("toy-tiny", tokenizer, "cost", meta=meta),
              "reward_critic": M.load_score_model("toy-tiny", tokenizer, "critic", meta=meta),
              "cost_critic": M.load_score_model("toy-tiny", tokenizer, "critic", meta=meta)}
    models = {name: M.prepare_model(m, d, trainable=name in MP.TRAINED, bf16=False) for name, m in models.items()}
    ids = torch.randint(4, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(d.rank))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                                   # left padding, as in a rollout
    report = {}
    for name in MP.TRAINED:
        model = models[name]
        optimizer = plumbing.make_optimizer(model, lr=1e-3, weight_decay=0.0)
        out_ = M.policy_logprobs(model, ids, mask) if name == "actor" else model(ids, mask).scores
        out_.sum().backward()
        optimizer.step()
        params = list(model.parameters())
        report[name] = {"fp32 params": storage_bytes(params),
                        "fp32 grads": storage_bytes(p.grad for p in params),
                        "AdamW states": storage_bytes(optimizer.state[p][k] for p in params
                                                      for k in ("exp_avg", "exp_avg_sq"))}
    for name in MP.FROZEN:
        report[name] = {"fp32 params": storage_bytes(models[name].parameters())}
    with torch.no_grad():
        for name in MP.FROZEN:
            models[name](input_ids=ids, attention_mask=mask)
    gathered = [p for name in MP.FROZEN for p in models[name].parameters() if not isinstance(p, DTensor)]
    report["frozen roots, left gathered"] = {"params": storage_bytes(gathered)}
    if d.is_main:
        (out / "rank0.json").write_text(json.dumps({"vocab_size": len(tokenizer), "persistent": report}))
    M.teardown_distributed()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    main(out_dir, sys.argv[2])
