"""bench.py: the window arithmetic by hand, the synthetic data's exact lengths, and one tiny run of
every section (figures present and sane; the stages ran with --no-save and wrote no checkpoint)."""

import json
import random
import sys
from dataclasses import replace

from tools import bench
import plumbing
from conftest import run


def test_windows_rate_by_hand():
    args = bench.Args(warmup=1, windows=2, window_steps=2)
    times = [10.0, 11.0, 12.0, 14.0, 15.0, 19.0]         # end of steps 0..5
    values = [100, 100, 100, 300, 100, 100]
    # window 1: steps 2-3 from t=11 to 14 -> 400 / 3; window 2: steps 4-5 from t=14 to 19 -> 200 / 5
    rate, steps = bench.windows_rate(times, values, args)
    assert abs(rate - (400 / 3 + 200 / 5) / 2) < 1e-9      # median of two = their mean
    assert abs(steps - (2 / 3 + 2 / 5) / 2) < 1e-9


def test_synthetic_text_has_exact_token_counts(tmp_path):
    tok = bench.make_tokenizer(tmp_path / "tok", 64)
    assert len(tok) == 64
    text = bench.words(random.Random(0), 17, 64)
    assert len(tok(text)["input_ids"]) == 17 + 1           # the words and BOS


def test_every_section_runs_and_prints_json(tmp_path):
    work = tmp_path / "work"
    p = run([sys.executable, "-m", "tools.bench", "--model", "toy-tiny", "--vocab_size", "64", "--warmup", "1",
             "--windows", "1", "--window_steps", "2", "--repeats", "1", "--pref_batch", "4", "--sft_batch", "4",
             "--gen_batch", "4", "--new_tokens", "16", "--ppo_iterations", "2", "--ppo_warmup", "1",
             "--ppo_static_kv_cache", "--workdir", work], timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    figures = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    got = {(f["section"], f["figure"], f.get("stage", "")) for f in figures}
    for want in [("preference", "real_tokens_per_s", "bare loop"), ("preference", "real_tokens_per_s", "reward.py"),
                 ("preference", "speedup_vs_bare_loop", "reward.py"), ("sft", "real_tokens_per_s", "sft.py"),
                 ("generation", "sample_vs_hf_generate", "model.sample"), ("ppo", "iteration_s", "ppo_lagrangian.py"),
                 ("generation", "static_cache_vs_growing", "model.sample, static KV cache (eager)"),  # eager on a CPU
                 ("ppo", "iteration_s", "ppo_lagrangian.py --static_kv_cache"),
                 ("ppo", "generation_s", "ppo_lagrangian.py"), ("ppo", "iteration_s", "rloo_lagrangian.py"),
                 ("ppo", "peak_memory", "rloo_lagrangian.py"), ("machine", "matmul_gflops", "fp32 2048^3")]:
        assert want in got, want
    values = {(f["section"], f["figure"], f.get("stage", "")): f["value"] for f in figures}
    assert values[("ppo", "response_length", "ppo_lagrangian.py")] <= 16
    assert values[("ppo", "response_length", "rloo_lagrangian.py")] <= 16
    # the static cache samples the same tokens: the same responses from the same seed
    assert values[("ppo", "response_length", "ppo_lagrangian.py --static_kv_cache")] == \
        values[("ppo", "response_length", "ppo_lagrangian.py")]
    # a shared prompt computes fewer positions than the pair's tokens; the plain loop pads
    assert values[("preference", "computed_per_real_token", "reward.py")] < 1
    assert values[("preference", "computed_per_real_token", "bare loop")] > 1
    assert all(v > 0 for (_, name, _), v in values.items() if name.endswith("_per_s"))
    assert "| preference: reward.py |" in p.stdout                               # the table
    assert not list(work.rglob("*.safetensors"))                                 # --no-save: no checkpoints


def test_estimate_memory_prints_the_plan(capsys):
    bench.main(replace(bench.Args(), estimate_memory=True, model="llama-7b", world_size=8))
    out = capsys.readouterr().out
    assert "FSDP2 over 8 ranks" in out and "peak:" in out and "PPO-Lagrangian (six models)" in out
    bench.main(replace(bench.Args(), estimate_memory=True, model="llama-7b", world_size=8, stage="rloo_lagrangian"))
    assert "RLOO-Lagrangian (four models)" in capsys.readouterr().out


def test_flags_take_dashes_or_underscores():
    args = plumbing.parse_args(bench.Args, ["--estimate-memory", "--world-size", "4", "--no-gradient-checkpointing",
                                     "--model=llama-1b"])
    assert args.estimate_memory and args.world_size == 4 and not args.gradient_checkpointing
    assert args.model == "llama-1b"
