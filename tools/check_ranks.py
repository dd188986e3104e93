"""tools/check_ranks.py: N ranks against one process on CPU (gloo), printed as the largest differences.

`make check-8-ranks` runs it at 8 ranks; tests/test_ppo_lagrangian.py runs the policy part at 4 ranks in
the suite (8 ranks on a 2-core machine are too slow for it). Two checks, on a tiny LLaMA whose shapes do
not divide by 4 or 8 (tests/dist_worker.py init_uneven: FSDP2 shards every tensor unevenly):

  policy  tests/dist_worker.py policy_steps: one update of rloo_lagrangian.py's actor and one rl_step of
          ppo_lagrangian.py (dual step, actor, both critics) on a fixed rollout of 32 sequences, each rank
          its slice, against one process with all 32 (dist_worker.compare)
  sft     sft.py for --sft_steps optimiser steps of the toy world's SFT data, N ranks x 1 sequence against
          one process x N sequences (the same global batch and order): final weights and per-step loss

Per model: the largest update of one weight, the largest difference between the two runs' weights, their
ratio; per loss (and lambda): the relative difference. The tests' tolerance is 1e-5 relative (the
reasoning: dist_worker.compare); this tool prints, it does not assert.

    python -m tools.check_ranks --nproc 8          # ~N min on 2 CPU cores (docs/bench.md, "8 ranks")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import dist_worker  # noqa: E402  (tests/dist_worker.py: the workers and their comparison)
import model as M  # noqa: E402
import toyworld  # noqa: E402


def launch(nproc: int, args: list) -> None:
    """One process (nproc 1, plain python) or torchrun with nproc ranks on this machine; fail loudly."""
    cmd = [sys.executable, *map(str, args)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(free_port()), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")


def free_port() -> int:
    """A free port for torchrun's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_report(one: Path, many: Path, init: Path) -> dict:
    """sft.py's two runs: weights as compare() reports them, and the per-step train loss."""
    tokenizer = M.load_tokenizer(init, "right")
    a, b, first = (M.load_causal_lm(str(f), tokenizer).state_dict() for f in (one, many, init))
    largest = max((a[k] - first[k]).abs().max().item() for k in a)
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    report = {"actor": {"largest_update": largest, "update_difference": difference,
                        "relative_difference": difference / largest}}
    la, lb = ([r["train/loss"] for r in map(json.loads, (f / "metrics.jsonl").read_text().splitlines())
               if "train/loss" in r] for f in (one, many))
    for step, (x, y) in enumerate(zip(la, lb, strict=True), 1):
        report[f"loss train step {step}"] = {"one": x, "many": y, "relative_difference": abs(x - y) / abs(x)}
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=8, help="ranks (a divisor of 32: 2, 4, 8, 16, 32)")
    ap.add_argument("--sft_steps", type=int, default=3, help="sft.py optimiser steps (0: skip sft)")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        toy = toyworld.ensure_toy_data(root / "toy")
        dist_worker.init_uneven(root / "uneven", str(toy / "tokenizer"))
        init = root / "uneven" / "init"
        reports = {}
        for n in (1, args.nproc):
            launch(n, ["tests/dist_worker.py", "policy_steps", root / f"policy{n}", init])
        starts = {"actor": init, "reward_critic": root / "uneven" / "reward", "cost_critic": root / "uneven" / "cost"}
        for mode in ("rloo_step", "ppo_step"):
            reports[mode] = dist_worker.compare(root / "policy1" / mode, root / f"policy{args.nproc}" / mode, starts)
        if args.sft_steps:
            for n in (1, args.nproc):
                launch(n, ["sft.py", "--model_name_or_path", init, "--dataset", toy / "sft", "--tokenizer_name_or_path",
                           toy / "tokenizer", "--output_dir", root / f"sft{n}", "--max_steps", args.sft_steps,
                           "--limit", 64, "--per_device_train_batch_size", args.nproc // n, "--eval_limit", 8,
                           "--lr_scheduler_type", "constant", "--toy_eval_samples", 0, "--log_every", 1])
            reports["sft"] = sft_report(root / "sft1", root / f"sft{args.nproc}", init)
    seconds = time.perf_counter() - t0
    print(f"{args.nproc} ranks against 1 process, CPU gloo, {os.cpu_count()} cores, {seconds:.0f} s in all")
    # a model's row: its largest update and the largest weight difference; a loss's: its value and difference
    print(f"{'check':10} {'what':26} {'value':>12} {'max |difference|':>17} {'relative':>9}")
    for check, report in reports.items():
        for what, r in report.items():
            weights = "largest_update" in r
            value, difference = (r["largest_update"], r["update_difference"]) if weights else (r["one"], abs(r["one"] - r["many"]))
            print(f"{check:10} {what + (' update' if weights else ''):26} {value:12.5g} {difference:17.3g} "
                  f"{r['relative_difference']:9.2g}")
    worst = {check: max(r["relative_difference"] for r in report.values()) for check, report in reports.items()}
    print("largest relative difference: " + ", ".join(f"{check} {w:.2g}" for check, w in worst.items()))
    return {"seconds": seconds, "reports": reports, "worst": worst}


if __name__ == "__main__":
    main()
