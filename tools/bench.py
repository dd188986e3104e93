"""tools/bench.py: throughput and memory of every stage, and the memory plan for big models.

What it measures, each figure a median over several timed windows after a warm-up, printed as one
JSON line ({"figure", "value", "unit", ...}) so that runs can be diffed; a Markdown table at the end.

  machine      the matmul rate this process can reach (fp32 2048^3 on a CPU, bf16 8192^3 on a GPU):
               the yardstick for every "fraction of peak" below
  preference   reward.py's training loop (eq. 5) on pairs shaped like real preference data, against a
               bare loop (random batches, right padding, the loss, AdamW) on the same model and pairs:
               pairs/s, real tokens/s, GFLOP/s (6N per real token), fraction of the matmul rate
  sft          sft.py's training loop, with and without length grouping
  generation   model.sample (the rollout's sampler) against Hugging Face `generate`, both with the
               KV cache, batch 16, 64 new tokens: tokens/s; and model.sample's static-KV-cache path
               (compiled on a GPU, eager on a CPU unless --compile_decode on) on the same prompts and seed
  ppo          ppo_lagrangian.py, 16 prompts x 64 new tokens per iteration, one PPO epoch: seconds
               per iteration split into generation / scoring (6 forwards) / update (actor + 2 critics);
               with --ppo_static_kv_cache also ppo_lagrangian.py --static_kv_cache;
               then rloo_lagrangian.py on the same 16 sequences (4 prompts x 4 answers): 4 forwards in
               scoring, the actor alone in the update
  memory       peak memory of each of the above (peak RSS on a CPU, max allocated on a GPU)

GFLOP/s counts 6N FLOPs per real token (N: the parameters in matmuls, all but the input embedding;
2N when generating), the reference's convention: a shared prompt (reward.py --share_prompt) counts as
useful work for both responses, and padding counts as nothing.

The stages run as they are (subprocesses of reward.py, sft.py, ppo_lagrangian.py on synthetic files)
and bench.py reads their metrics.jsonl, so what is timed is the code users run. Models are random-init
model.py presets; the text is random words from a synthetic word-level tokenizer of the preset's
vocabulary size, so every token count is exact.

    python -m tools.bench                                   # the toy-sized model on this CPU, ~3 min
    python -m tools.bench --only preference generation      # some sections
    python -m tools.bench --model llama-1b --nproc_per_node 1 --length_scale 4   # a GPU: FSDP2 + bf16
    python -m tools.bench --model llama-1b --vocab_size 32000 --nproc_per_node 1 --length_scale 4 \
        --new_tokens 128 --only generation ppo --ppo_static_kv_cache   # a GPU: both decoding paths
    python -m tools.bench --estimate-memory --model llama-7b --world_size 8      # memory_plan.py's table
    python -m tools.bench --estimate-memory --model llama-7b --stage rloo_lagrangian

Threads: the CPU figures depend on them; bench.py uses torch's setting (OMP_NUM_THREADS) for every
part and prints it. Run it on a quiet machine: another busy process halves the figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

import model as M
import plumbing
from plumbing import UserError

ROOT = Path(__file__).resolve().parent.parent  # the stages run from the repository root

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), for MFU.
GPU_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


@dataclass
class Args:
    # Ranges checked at parse time (plumbing.check_limits); any other number must be finite and >= 0.
    LIMITS: ClassVar[dict] = dict.fromkeys(("vocab_size", "pref_batch", "sft_batch", "gen_batch", "new_tokens", "windows",
                                        "window_steps", "repeats", "ppo_iterations", "world_size"), (1, None))

    only: list[str] = field(default_factory=list)
    """sections to run (machine preference sft generation ppo); default: all"""
    model: str = "toy-small"
    """a model.py preset: toy-small is the reference tiny LLaMA (hidden 128, 4 layers); llama-1b, llama-7b"""
    vocab_size: int = 512
    """vocabulary of the synthetic tokenizer (and of the model); llama presets use 32000"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    nproc_per_node: int = 0
    """0: run the stages as plain `python x.py`; N: under `torchrun --nproc_per_node N` (FSDP2)"""
    length_scale: float = 1.0
    """multiply the synthetic lengths (pairs of 40-118 tokens at 1.0) for bigger models"""
    pref_batch: int = 8
    """pairs per optimiser step in the preference benchmark"""
    sft_batch: int = 16
    """sequences per optimiser step in the SFT benchmark"""
    gen_batch: int = 16
    """prompts per generation / PPO iteration"""
    new_tokens: int = 64
    """tokens generated per prompt"""
    compile_decode: str = "auto"
    """the static-KV-cache path's decoding step: auto (compiled on CUDA, eager on a CPU, where inductor's compile
    takes ~1 min for a tiny model), on, off; the stages compile it on CUDA only (--no-compile_decode: never)"""
    ppo_static_kv_cache: bool = False
    """also time ppo_lagrangian.py --static_kv_cache (--no-compile_decode with --compile_decode off)"""
    warmup: int = 4
    """untimed steps (iterations) before the first window"""
    windows: int = 5
    """timed windows; the median is reported"""
    window_steps: int = 10
    """optimiser steps per window (generation: one call per window)"""
    repeats: int = 3
    """runs of each training loop, interleaved; the median over runs is reported"""
    ppo_iterations: int = 6
    """PPO-Lagrangian iterations (the first `ppo_warmup` untimed)"""
    ppo_warmup: int = 2
    """untimed PPO iterations"""
    gradient_checkpointing: bool = False
    """pass --gradient_checkpointing to the stages"""
    workdir: str | None = None
    """where the synthetic data and runs go (default: a temporary folder, deleted)"""
    estimate_memory: bool = False
    """print memory_plan.py's per-rank memory table instead (see --world_size)"""
    world_size: int = 8
    """--estimate-memory: ranks the models are sharded over"""
    stage: str = "ppo_lagrangian"
    """--estimate-memory: ppo_lagrangian (six models) or rloo_lagrangian (four)"""
    doc: str | None = None
    """also write the table, and the 7B memory plan, into this Markdown file's generated blocks (make bench)"""


# --------------------------------------------------------------------------------------------
# Output: one JSON line per figure, then a table
# --------------------------------------------------------------------------------------------

FIGURES: list[dict] = []


def report(section: str, name: str, value: float | str, unit: str, **extra) -> None:
    value = round(value, 4) if isinstance(value, float) else value
    record = {"section": section, "figure": name, "value": value, "unit": unit, **extra}
    FIGURES.append(record)
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------
# 1. The machine: its matmul rate
# --------------------------------------------------------------------------------------------


def matmul_gflops(device: torch.device) -> float:
    """Median rate of a square matmul: fp32 2048^3 on a CPU, bf16 8192^3 on a GPU. GFLOP/s."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    rates = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:  # the first three are warm-up
            rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def gpu_peak_gflops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((tf * 1000 for key, tf in GPU_BF16_PEAK_TFLOPS.items() if key in name), None)


# --------------------------------------------------------------------------------------------
# 2. Synthetic data with exact token counts
# --------------------------------------------------------------------------------------------


def make_tokenizer(folder: Path, vocab_size: int):
    """A LLaMA-like word-level tokenizer of exactly `vocab_size` tokens: BOS prepended, EOS and PAD
    single tokens, words w4 ... w{V-1}; every word is one token, so text lengths are token counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096)
    fast.save_pretrained(folder)
    return M.load_tokenizer(folder, "right")


def words(rng: random.Random, n: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(4, vocab_size)}" for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(folder: Path, args: Args, rows: int, ppo_prompt_words: int) -> list[dict]:
    """Write preference pairs, SFT rows and RL prompts under folder; return the pairs. Lengths (at --length_scale 1) are those of the
    reference measurement in issue #7: prompt words U[5, 30] and each response U[25, 78], which with
    the template, BOS and EOS gives pairs of 40-118 tokens, ~74% of right-padded slots real at 8 pairs."""
    rng = random.Random(0)
    V, s = args.vocab_size, args.length_scale
    prompt_len = lambda: rng.randint(round(5 * s), round(30 * s))     # noqa: E731
    response_len = lambda: rng.randint(round(25 * s), round(78 * s))  # noqa: E731
    pairs = []
    for _ in range(rows):
        prompt = words(rng, prompt_len(), V)
        pairs.append({"prompt": prompt, "response_0": words(rng, response_len(), V),
                      "response_1": words(rng, response_len(), V), "better_response_id": rng.randint(0, 1),
                      "safer_response_id": rng.randint(0, 1), "is_response_0_safe": rng.random() < 0.5,
                      "is_response_1_safe": rng.random() < 0.5})
    write_jsonl(folder / "preference" / "train.jsonl", pairs)
    sft = [{"instruction": words(rng, prompt_len(), V), "input": "", "output": words(rng, response_len(), V)}
           for _ in range(rows)]
    write_jsonl(folder / "sft" / "train.jsonl", sft)
    # RL prompts of one length, so every iteration has the same shape (S prompt tokens + new_tokens)
    write_jsonl(folder / "prompts" / "train.jsonl", [{"prompt": words(rng, ppo_prompt_words, V)} for _ in range(rows)])
    return pairs


# --------------------------------------------------------------------------------------------
# 3. Running a stage and reading its metrics
# --------------------------------------------------------------------------------------------


def run_stage(script: str, argv: list[str], args: Args, out: Path) -> list[dict]:
    """Run a stage (python or torchrun), its output in <out>.log, and return its metrics.jsonl
    records (the stages log their own peak memory, `memory/peak_gib`)."""
    if args.nproc_per_node:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc_per_node}", script]
    else:
        cmd = [sys.executable, script]
    cmd += argv + ["--output_dir", str(out), "--no-save", "--overwrite"] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
    env = dict(os.environ, CI="true")  # no progress bars
    log = out.with_suffix(".log")
    with log.open("w") as f:
        returncode = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise UserError(f"{script} failed (log {log}): " + " / ".join(tail))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def windows_rate(times: list[float], values: list[float], args: Args) -> tuple[float, float]:
    """times[k]: wall clock at the end of step k; values[k]: what step k processed (tokens).
    Steps 0..warmup are untimed; then `windows` windows of `window_steps` steps each. Returns the
    median over windows of sum(values) / seconds, and the median steps/s."""
    rates, step_rates = [], []
    for w in range(args.windows):
        lo = args.warmup + w * args.window_steps          # the window runs from the end of step lo
        hi = min(lo + args.window_steps, len(times) - 1)
        if hi <= lo:
            break
        seconds = times[hi] - times[lo]
        rates.append(sum(values[lo + 1:hi + 1]) / seconds)
        step_rates.append((hi - lo) / seconds)
    if not rates:
        raise UserError(f"too few steps to time: {len(times)} (need --warmup + 2)")
    return statistics.median(rates), statistics.median(step_rates)


def stage_rate(records: list[dict], key: str, args: Args) -> tuple[float, float]:
    """windows_rate over a stage's metrics.jsonl (log_every 1: one record per step, cumulative "time")."""
    steps = [r for r in records if key in r]
    return windows_rate([r["time"] for r in steps], [r[key] for r in steps], args)


def matmul_parameters(preset: str, vocab_size: int, causal_lm: bool) -> int:
    """N in '6N FLOPs per token': parameters that take part in matmuls, i.e. all but the input
    embedding (a lookup); a causal LM's untied output layer counts, a score head's 1 x E too."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = M.preset_config(preset, vocab_size=vocab_size)
    with torch.device("meta"):
        net = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    embedding = net.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in net.parameters()) - embedding + (0 if causal_lm else config.hidden_size)


# --------------------------------------------------------------------------------------------
# 4. Sections
# --------------------------------------------------------------------------------------------


def bare_preference_loop(args: Args, tokenizer, pairs_text: list[dict], device: torch.device) -> tuple[float, float, float]:
    """The baseline: a reward-model loop as one writes it first. Random batches of pairs, [y_w; y_l]
    right-padded to the longest, one forward, eq. 5, AdamW. Returns (real tokens/s, steps/s, computed
    token positions per real token)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    config = M.preset_config(args.model, vocab_size=len(tokenizer))
    net = M.ScoreModel(AutoModel.from_config(config), "reward").to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    eos = tokenizer.eos_token
    seqs = [tokenizer([M.format_prompt(p["prompt"]) + p[f"response_{i}"] + eos for i in (0, 1)])["input_ids"]
            for p in pairs_text]
    order = list(range(len(seqs)))
    random.Random(0).shuffle(order)
    B = args.pref_batch
    times, tokens, slots = [], [], []
    for step in range(args.warmup + args.windows * args.window_steps):
        batch = [seqs[i] for i in order[step * B:(step + 1) * B]]
        rows = [pair[0] for pair in batch] + [pair[1] for pair in batch]
        L = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (L - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            scores = net(ids, mask).end_scores
        loss = -F.logsigmoid(scores[:B] - scores[B:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # as any loop that logs its loss
        times.append(time.perf_counter())
        tokens.append(sum(map(len, rows)))
        slots.append(len(rows) * L)
    return (*windows_rate(times, tokens, args), sum(slots) / sum(tokens))


def interleaved(runs: dict, repeats: int) -> dict[str, tuple]:
    """Run each benchmark `repeats` times, round-robin (a noisy neighbour then slows one run of each,
    not every run of one), and take the median of each figure over the runs.
    runs: {name: () -> (real tokens/s, steps/s, computed tokens per real token, peak GiB)}."""
    results: dict[str, list] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return {name: tuple(statistics.median(x) for x in zip(*rs)) for name, rs in results.items()}


def stage_run(script: str, stage_args: list[str], args: Args, out: Path):
    """A benchmark closure: run the stage for the timed steps only, return its figures."""
    stop = ["--stop_at_step", str(args.warmup + args.windows * args.window_steps + 1)]
    count = [0]

    def run() -> tuple[float, float, float, float]:
        count[0] += 1
        records = run_stage(script, stage_args + stop, args, out.with_name(f"{out.name}-{count[0]}"))
        tokens, steps = stage_rate(records, "train/real_tokens", args)
        steps_all = [r for r in records if "train/real_tokens" in r]
        computed = sum(r["train/computed_tokens"] for r in steps_all) / sum(r["train/real_tokens"] for r in steps_all)
        return tokens, steps, computed, steps_all[-1]["memory/peak_gib"]
    return run


def report_training(section: str, results: dict, batch: int, unit: str, N: int, peak: float, **extra) -> None:
    for variant, (tokens, steps, computed, memory) in results.items():
        common = dict(stage=variant, model=extra["model"], **{k: v for k, v in extra.items() if k != "model"})
        report(section, "real_tokens_per_s", tokens, "tokens/s", **common)
        report(section, f"{unit}_per_s", steps * batch, f"{unit}/s", **common)
        report(section, "gflops", 6 * N * tokens / 1e9, "GFLOP/s", **common)
        report(section, "fraction_of_peak", 6 * N * tokens / 1e9 / peak, "fraction", **common)
        report(section, "computed_per_real_token", computed, "x", **common)
        report(section, "peak_memory", memory, "GiB", **common)


def section_preference(args: Args, work: Path, tokenizer, pairs: list[dict], device: torch.device,
                       peak: float) -> None:
    stage_args = ["--model_name_or_path", args.model, "--tokenizer_name_or_path", str(work / "tokenizer"),
                  "--recipe", "toy", "--dataset", str(work / "preference"), "--eval_split", "", "--epochs", "1",
                  "--per_device_train_batch_size", str(args.pref_batch // max(1, args.nproc_per_node)),
                  "--log_every", "1", "--max_length", "4096", "--lr", "1e-4"]

    def bare() -> tuple[float, float, float, float]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tokens, steps, computed = bare_preference_loop(args, tokenizer, pairs, device)
        memory = plumbing.peak_memory_gib(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the GPU back to the stages' processes
        return tokens, steps, computed, memory

    results = interleaved({
        "bare loop": bare,
        "reward.py": stage_run("reward.py", stage_args, args, work / "reward"),
        "reward.py --no-share_prompt": stage_run("reward.py", stage_args + ["--no-share_prompt"], args,
                                                 work / "reward-noshare"),
        "reward.py --no-share_prompt --no-group_by_length": stage_run(
            "reward.py", stage_args + ["--no-share_prompt", "--no-group_by_length"], args, work / "reward-plain"),
    }, args.repeats)
    N = matmul_parameters(args.model, len(tokenizer), causal_lm=False)
    report_training("preference", results, args.pref_batch, "pairs", N, peak, model=args.model, pairs=len(pairs))
    report("preference", "speedup_vs_bare_loop", results["reward.py"][0] / results["bare loop"][0], "x",
           stage="reward.py")


def section_sft(args: Args, work: Path, tokenizer, peak: float) -> None:
    stage_args = ["--model_name_or_path", args.model, "--tokenizer_name_or_path", str(work / "tokenizer"),
                  "--recipe", "toy", "--dataset", str(work / "sft"), "--eval_split", "", "--epochs", "1",
                  "--per_device_train_batch_size", str(args.sft_batch // max(1, args.nproc_per_node)),
                  "--log_every", "1", "--max_length", "4096", "--lr", "1e-4"]
    results = interleaved({"sft.py": stage_run("sft.py", stage_args, args, work / "sft"),
                           "sft.py --no-group_by_length": stage_run("sft.py", stage_args + ["--no-group_by_length"],
                                                                    args, work / "sft-nogroup")}, args.repeats)
    N = matmul_parameters(args.model, len(tokenizer), causal_lm=True)
    report_training("sft", results, args.sft_batch, "sequences", N, peak, model=args.model)
    report("sft", "speedup_from_grouping", results["sft.py"][0] / results["sft.py --no-group_by_length"][0], "x",
           stage="sft.py")


def section_generation(args: Args, tokenizer, device: torch.device) -> None:
    """model.sample vs HF generate on the same random-init policy and left-padded prompts, and
    model.sample's static-KV-cache path (compiled per --compile_decode) from the same seed. EOS is never
    emitted (an id outside the vocabulary), so all produce exactly new_tokens per row."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(M.preset_config(args.model, vocab_size=len(tokenizer))).to(device)
    if device.type == "cuda":
        policy.to(torch.bfloat16)
    policy.eval()
    rng = random.Random(1)
    tokenizer.padding_side = "left"
    prompts = [M.format_prompt(words(rng, rng.randint(5, 30), args.vocab_size)) for _ in range(args.gen_batch)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    T = args.new_tokens
    never = len(tokenizer) + 7  # an EOS id that cannot be sampled

    compiled = args.compile_decode == "on" or args.compile_decode == "auto" and device.type == "cuda"
    static = f"model.sample, static KV cache ({'compiled' if compiled else 'eager'})"

    def ours(**static_cache):
        torch.manual_seed(0)  # the same draws on both paths
        M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=T, eos_token_id=never,
                 pad_token_id=tokenizer.pad_token_id, temperature=1.0, **static_cache)

    def hf(use_cache: bool):
        policy.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True, top_k=0,
                        top_p=1.0, temperature=1.0, max_new_tokens=T, min_new_tokens=0, eos_token_id=None,
                        pad_token_id=tokenizer.pad_token_id, use_cache=use_cache)

    N = matmul_parameters(args.model, len(tokenizer), causal_lm=True)
    rates = {}
    for name, fn in (("model.sample", ours), (static, lambda: ours(static_cache=True, compile=compiled)),
                     ("HF generate", lambda: hf(True)), ("HF generate, no KV cache", lambda: hf(False))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        repeats = args.windows if "no KV" not in name else 3
        for i in range(1 + repeats):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            sync(device)
            if i > 0:  # the first call warms up
                times.append(time.perf_counter() - t0)
        rates[name] = args.gen_batch * T / statistics.median(times)
        memory = plumbing.peak_memory_gib(device)
        common = dict(stage=name, model=args.model, batch=args.gen_batch, new_tokens=T)
        report("generation", "tokens_per_s", rates[name], "tokens/s", **common)
        report("generation", "gflops", 2 * N * rates[name] / 1e9, "GFLOP/s", **common)
        report("generation", "peak_memory", memory, "GiB", **common)
    report("generation", "sample_vs_hf_generate", rates["model.sample"] / rates["HF generate"], "x",
           stage="model.sample")
    report("generation", "static_cache_vs_growing", rates[static] / rates["model.sample"], "x", stage=static)


def load_first_prompt(work: Path) -> str:
    return json.loads((work / "prompts" / "train.jsonl").read_text().splitlines()[0])["prompt"]


def section_ppo(args: Args, work: Path, tokenizer) -> None:
    """ppo_lagrangian.py with six random-init preset models, then rloo_lagrangian.py with four:
    iterations of gen_batch sequences (one prompt length) x new_tokens, one PPO epoch, the whole batch in
    one update micro-batch. rloo_lagrangian.py samples 4 answers to each of gen_batch / 4 prompts."""
    n_prompt = len(tokenizer(M.format_prompt(load_first_prompt(work)))["input_ids"])  # every prompt's length
    per_rank = args.gen_batch // max(1, args.nproc_per_node)
    runs = [("ppo_lagrangian.py", per_rank), ("rloo_lagrangian.py", per_rank // 4)]
    if args.ppo_static_kv_cache:
        runs.insert(1, ("ppo_lagrangian.py --static_kv_cache", per_rank))
    for name, prompts in runs:
        stage, *flags = name.split()
        if args.compile_decode == "off" and flags:
            flags.append("--no-compile_decode")
        if stage == "rloo_lagrangian.py" and (prompts == 0 or prompts * 4 != per_rank):
            raise UserError(f"--gen_batch {args.gen_batch}: rloo_lagrangian.py needs whole groups of 4 per rank")
        stage_args = ["--actor_model_name_or_path", args.model, "--reward_model_name_or_path", args.model,
                      "--cost_model_name_or_path", args.model, "--tokenizer_name_or_path", str(work / "tokenizer"),
                      "--recipe", "toy", "--dataset", str(work / "prompts"),
                      "--limit", str(args.ppo_iterations * prompts * max(1, args.nproc_per_node)),
                      "--epochs", "1", "--per_device_prompt_batch_size", str(prompts),
                      "--per_device_train_batch_size", str(per_rank), "--max_length", str(n_prompt + args.new_tokens),
                      "--sample_every", "0", "--log_every", "1", "--threshold", "0"] + flags
        if stage == "rloo_lagrangian.py":
            stage_args += ["--samples_per_prompt", "4"]
        records = run_stage(stage, stage_args, args, work / (stage.removesuffix(".py") + "-static" * bool(flags)))
        timed = records[args.ppo_warmup:]
        parts = {k: statistics.median(r[f"time/{k}"] for r in timed) for k in ("generation", "scoring", "training")}
        common = dict(stage=name, model=args.model, prompts=args.gen_batch, new_tokens=args.new_tokens)
        for k, v in parts.items():
            report("ppo", f"{k}_s", v, "s/iteration", **common)
        total = statistics.median(sum(r[f"time/{k}"] for k in parts) for r in timed)
        report("ppo", "iteration_s", total, "s/iteration", **common)
        report("ppo", "response_length", statistics.median(r["policy/response_length"] for r in timed), "tokens", **common)
        report("ppo", "peak_memory", records[-1]["memory/peak_gib"], "GiB", **common)


# --------------------------------------------------------------------------------------------
# 5. main
# --------------------------------------------------------------------------------------------


def table() -> str:
    """The figures as Markdown: the machine, then one row per timed thing."""
    by: dict[tuple, dict] = {}
    for f in FIGURES:
        by.setdefault((f["section"], f.get("stage", "")), {})[f["figure"]] = f["value"]
    get = lambda key, name, fmt: format(by[key][name], fmt) if name in by[key] else ""  # noqa: E731
    machine = [v for (section, _), figs in by.items() if section == "machine" for v in figs.values()]
    rate = lambda g: f"{g / 1000:.0f} TFLOP/s" if g >= 1000 else f"{g:.0f} GFLOP/s"  # noqa: E731
    lines = [f"machine: {machine[0]}; matmul {rate(machine[1])}"
             + (f" (data sheet {rate(machine[2])})" if len(machine) > 2 else ""), "",
             "| stage | real tokens/s | items/s | GFLOP/s | of peak | computed / real tokens | peak memory GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, figs in by.items():
        section, stage = key
        items = next((k for k in figs if k.endswith("_per_s") and k != "real_tokens_per_s"), None)
        if section in ("preference", "sft") and "real_tokens_per_s" in figs:
            lines.append(f"| {section}: {stage} | {figs['real_tokens_per_s']:.0f} | "
                         f"{figs[items]:.1f} {items.removesuffix('_per_s')} | {get(key, 'gflops', '.1f')} | "
                         f"{get(key, 'fraction_of_peak', '.0%')} | {get(key, 'computed_per_real_token', '.2f')} | "
                         f"{get(key, 'peak_memory', '.2f')} |")
        elif section == "generation" and "tokens_per_s" in figs:
            lines.append(f"| generation: {stage} | {figs['tokens_per_s']:.0f} | | {get(key, 'gflops', '.1f')} | | | "
                         f"{get(key, 'peak_memory', '.2f')} |")
    for (section, stage), figs in by.items():
        for name, against in (("speedup_vs_bare_loop", "the bare loop"), ("speedup_from_grouping",
                              "--no-group_by_length"), ("sample_vs_hf_generate", "HF generate"),
                              ("static_cache_vs_growing", "model.sample with the growing cache")):
            if name in figs:
                lines.append(f"\n{section}: {stage} runs at **{figs[name]:.2f}x** the speed of {against}")
        if section == "ppo":
            models = "four models, 4 answers per prompt" if stage.startswith("rloo") else "six models"
            lines.append(f"\n{stage} ({models}): one iteration **{figs['iteration_s']:.2f} s** = generation "
                         f"{figs['generation_s']:.2f} + scoring {figs['scoring_s']:.2f} + update "
                         f"{figs['training_s']:.2f} s; {figs['response_length']:.0f} tokens per response; "
                         f"peak memory {figs['peak_memory']:.2f} GiB")
    return "\n".join(lines)


def write_doc(path: Path, figures: str) -> None:
    """Refresh the generated blocks of a Markdown file (docs/bench.md): `bench-cpu` gets this run's
    table, `memory-7b` the memory plans for LLaMA-7B on 8 x 80 GB without and with activation
    checkpointing, of ppo_lagrangian.py and of rloo_lagrangian.py (a computation from the config alone:
    the same on every machine)."""
    from tools import memory_plan

    plans = []
    for extra in ([], ["--gradient_checkpointing"], ["--stage", "rloo_lagrangian"],
                  ["--stage", "rloo_lagrangian", "--gradient_checkpointing"]):
        argv = ["--model", "llama-7b", "--world_size", "8", "--gpu_memory_gib", "80"] + extra
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            memory_plan.main(argv)
        text = "\n".join(line for line in out.getvalue().strip().splitlines() if not line.startswith("{"))
        plans.append(f"`python -m tools.memory_plan {' '.join(argv)}`:\n\n```\n{text.strip()}\n```")
    doc = path.read_text()
    for name, body in (("bench-cpu", figures), ("memory-7b", "\n\n".join(plans))):
        if f"<!-- {name}:start -->" not in doc:
            raise UserError(f"--doc {path}: no <!-- {name}:start --> ... <!-- {name}:end --> block to refresh")
        doc = re.sub(rf"<!-- {name}:start -->.*?<!-- {name}:end -->",
                     lambda m: f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->", doc, flags=re.S)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc)
    tmp.replace(path)
    print(f"bench.py: {path} refreshed", flush=True)


def main(args: Args) -> None:
    if args.estimate_memory:
        from tools import memory_plan
        memory_plan.main(["--model", args.model, "--world_size", str(args.world_size), "--stage", args.stage]
                         + (["--gradient_checkpointing"] if args.gradient_checkpointing else []))
        return
    if args.doc:  # refuse now, not after minutes of timing
        doc = Path(args.doc).read_text() if Path(args.doc).is_file() else ""
        if not all(f"<!-- {b}:start -->" in doc for b in ("bench-cpu", "memory-7b")):
            raise UserError(f"--doc {args.doc}: not a file with <!-- bench-cpu:start --> and <!-- memory-7b:start --> blocks")
    if args.compile_decode not in ("auto", "on", "off"):
        raise UserError(f"--compile_decode {args.compile_decode!r}: auto, on or off")
    sections = args.only or ["machine", "preference", "sft", "generation", "ppo"]
    unknown = set(sections) - {"machine", "preference", "sft", "generation", "ppo"}
    if unknown:
        raise UserError(f"--only: unknown sections {sorted(unknown)}")
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.model not in M.PRESETS:
        raise UserError(f"--model {args.model!r}: bench.py builds random-init presets; choose one of {', '.join(M.PRESETS)}")
    plumbing.quiet_hf()
    t_start = time.time()
    report("machine", "device", device_name(device), "", torch=torch.__version__, threads=torch.get_num_threads())
    measured = matmul_gflops(device)
    report("machine", "matmul_gflops", measured, "GFLOP/s", stage="fp32 2048^3" if device.type == "cpu" else "bf16 8192^3")
    peak = measured
    if device.type == "cuda" and gpu_peak_gflops(device):
        peak = gpu_peak_gflops(device)  # MFU against the data sheet, as usual on GPUs
        report("machine", "datasheet_bf16_gflops", peak, "GFLOP/s", stage=torch.cuda.get_device_name(device))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        tokenizer = make_tokenizer(work / "tokenizer", args.vocab_size)
        steps = args.warmup + args.windows * args.window_steps
        # RL prompts of one length, at most new_tokens (ppo_lagrangian.py keeps prompts <= max_length / 2)
        template = len(tokenizer(M.format_prompt(""))["input_ids"])
        ppo_prompt_words = min(round(17 * args.length_scale), args.new_tokens - template)
        if ppo_prompt_words < 4:
            raise UserError(f"--new_tokens {args.new_tokens}: give at least {template + 4} (the prompt template "
                              f"alone is {template} tokens, and a prompt may be at most as long as the response)")
        # a few more rows than the timed steps need, and at least 64 batches so grouping has room
        pairs = make_data(work, args, max(64, steps + 2) * max(args.pref_batch, args.sft_batch), ppo_prompt_words)
        runs = {"preference": lambda: section_preference(args, work, tokenizer, pairs, device, peak),
                "sft": lambda: section_sft(args, work, tokenizer, peak),
                "generation": lambda: section_generation(args, tokenizer, device),
                "ppo": lambda: section_ppo(args, work, tokenizer)}
        failed = []
        for name, run in runs.items():
            if name in sections:
                try:  # one failing section (say, out of memory) does not cost the others' figures
                    run()
                except (UserError, RuntimeError) as e:
                    failed.append(name)
                    print(f"bench.py: section {name} failed: {plumbing.first_line(e)}", file=sys.stderr, flush=True)
    print(f"\n{table()}\n\nbench.py: {time.time() - t_start:.0f} s on {device_name(device)}", flush=True)
    if args.doc and not failed:
        command = " ".join(["python -m tools.bench"] + sys.argv[1:])
        header = (f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} {command}` on "
                  f"{device_name(device)}, {time.time() - t_start:.0f} s; the table it prints after its JSON lines:\n\n")
        write_doc(Path(args.doc), header + table())
    if failed:
        raise UserError(f"sections {', '.join(failed)} failed (see above)")


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.splitlines()[0])))
