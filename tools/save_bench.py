"""tools/save_bench.py: the wall time and peak CPU memory of one resumable checkpoint save, the way the
stages save (model.save_checkpoint with the AdamW state from plumbing.optimizer_state), for a
~100M-parameter LLaMA under FSDP2 on CPU ranks (gloo).

    torchrun --nproc_per_node 2 -m tools.save_bench              # 2 CPU ranks, ~110M parameters
    torchrun --nproc_per_node 2 -m tools.save_bench --repeats 3 --preset toy-small   # seconds, not minutes
    torchrun --nproc_per_node 8 -m tools.save_bench --device cuda                    # 8 GPUs, NCCL

Prints, on rank 0: parameters, bytes written, seconds per save (each repeat, then the median) and
each rank's peak resident memory during the saves (ru_maxrss growth over the model and optimiser
already held). The same command before and after a change of the save compares them; time it on a
quiet machine (nothing else running), since the ranks share the cores.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import plumbing  # noqa: E402

# ~110M parameters: LLaMA shapes at GPT-2-small width (12 layers x 768, vocab 32000)
PRESETS = {"100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048,
                        vocab_size=32000),
           "toy-small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344,
                             vocab_size=1000)}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="100m", choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to save (default: a temporary folder, removed after)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu: gloo ranks (as measured in docs/bench.md); cuda: one GPU per rank, NCCL")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from tools.bench import make_tokenizer

    d = M.init_distributed(args.device)
    shape = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        where = [args.dir or tmp]  # rank 0's folder for every rank (the ranks share a file system)
        if d.enabled:
            dist.broadcast_object_list(where, src=0)
        work = Path(where[0])
        if d.is_main:
            make_tokenizer(work / "tokenizer", shape["vocab_size"])
        M.barrier()
        tokenizer = M.load_tokenizer(work / "tokenizer", "right")
        M.seed_everything(0)
        model = AutoModelForCausalLM.from_config(M.preset_config("toy-tiny", **shape))
        n_params = sum(p.numel() for p in model.parameters())
        model = M.prepare_model(model, d, trainable=True, bf16=False)
        optimizer = plumbing.make_optimizer(model, lr=1e-4, weight_decay=0.01)
        ids = torch.randint(4, shape["vocab_size"], (2, 16), device=d.device)
        model(input_ids=ids, labels=ids).loss.backward()  # one step: AdamW's moments exist, as in a run
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        held = peak_rss_bytes()
        seconds = []
        for _ in range(args.repeats):
            M.barrier()
            start = time.perf_counter()
            state = plumbing.merge_states(plumbing.optimizer_state(model, optimizer, "optimizer"),
                                          {"tensors": {}, "json": {"trainer": {"step": 1}}})
            M.save_checkpoint(work / "run", d, tokenizer, {"": model}, train_state=state)
            del state
            M.barrier()
            seconds.append(time.perf_counter() - start)
        grown = torch.tensor([peak_rss_bytes() - held], dtype=torch.float64, device=d.device)
        per_rank = [torch.zeros_like(grown) for _ in range(d.world_size)] if d.enabled else [grown]
        if d.enabled:
            dist.all_gather(per_rank, grown)
        if d.is_main:
            written = sum(f.stat().st_size for f in (work / "run").rglob("*") if f.is_file())
            print(f"save_bench: {args.preset} LLaMA, {n_params / 1e6:.1f}M parameters, {d.world_size} rank(s), "
                  f"{written / 2**20:.0f} MiB written per save")
            print("seconds per save: " + ", ".join(f"{s:.2f}" for s in seconds) + f"; median {statistics.median(seconds):.2f}")
            print("peak RSS growth during the saves, per rank: "
                  + ", ".join(f"rank {r} {t.item() / 2**20:.0f} MiB" for r, t in enumerate(per_rank)))
        M.barrier()
    M.teardown_distributed()


if __name__ == "__main__":
    main()
