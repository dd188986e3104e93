"""Real data as a user brings it: the hand-written PKU-SafeRLHF / Alpaca fixture in tests/fixtures/real
(its README lists every awkward row) and a tiny LLaMA with its own BPE tokenizer, trained here on the
fixture's text (not the toy world's), through sft -> reward -> cost -> ppo_lagrangian -> evaluate with
--recipe paper, small overrides and --eval_dataset. The data summaries' counts are asserted exactly."""

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run

import cost
import evaluate
import plumbing
import ppo_lagrangian
import reward
import sft

REAL = ROOT / "tests" / "fixtures" / "real"
SMALL = ["--max_length", "256", "--no-gradient_checkpointing", "--log_every", "1"]


def make_real_model(folder: Path) -> Path:
    """A local `save_pretrained` folder as a user brings one: a byte-level BPE tokenizer trained on the
    fixture's text (BOS prepended, EOS and PAD its own tokens) and a random-init two-layer LLaMA."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [v for f in sorted(REAL.rglob("*.jsonl")) for line in f.read_text().splitlines()
             for v in json.loads(line).values() if isinstance(v, str)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def stage(*args):
    p = run([sys.executable, *map(str, args)], cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def refused(module, *args) -> str:
    """The refusal's one line, run in-process (run_main turns the same UserError into `error: ...`, exit 2)."""
    with pytest.raises(plumbing.UserError) as e:
        parsed = plumbing.parse_args(module.Args, list(map(str, args)))
        module.train(parsed, module.COST if module is cost else reward.REWARD)
    return str(e.value)


def dropped(summary: dict) -> dict:
    return {reason: d["rows"] for reason, d in summary["dropped"].items()}


def test_real_format_data_through_every_stage(tmp_path):
    model = make_real_model(tmp_path / "tiny")
    runs = tmp_path / "runs"
    pref_train, pref_test = REAL / "preference" / "train.jsonl", REAL / "preference" / "test.jsonl"

    # SFT: the paper's recipe (its Alpaca has no test split, so evaluation comes by name)
    stage("sft.py", "--recipe", "paper", "--model_name_or_path", model, "--dataset", REAL / "sft",
          "--eval_dataset", REAL / "sft" / "test.jsonl", "--eval_split", "test", "--per_device_train_batch_size", 4,
          "--gradient_accumulation_steps", 1, "--max_steps", 2, "--output_dir", runs / "sft", *SMALL)
    summary = json.loads((runs / "sft" / "data_summary.json").read_text())
    assert (summary["train"]["rows_read"], summary["train"]["rows_used"]) == (24, 21)
    assert dropped(summary["train"]) == {"empty response": [9], "duplicate": [20], "prompt fills the window": [15]}
    assert (summary["eval"]["rows_read"], summary["eval"]["rows_used"], summary["eval"]["stats"]["also_in_train"]) == (8, 8, 0)

    # reward and cost: one training file, the test file by name
    pair_args = ["--recipe", "paper", "--model_name_or_path", runs / "sft", "--dataset", pref_train, "--eval_dataset",
                 pref_test, "--per_device_train_batch_size", 4, "--max_steps", 2, *SMALL]
    p = stage("reward.py", *pair_args, "--output_dir", runs / "reward")
    assert "perf/tokens_per_s" in p.stdout and "recipe paper | differs from the paper: --model_name_or_path" in p.stdout
    assert "WARNING: --dataset" in p.stderr and "20.0% of the rows dropped" in p.stderr   # 8 of 40
    stage("cost.py", *pair_args, "--output_dir", runs / "cost")
    common = {"prompt fills the window": [8, 26], "identical after truncation": [13, 31], "empty response": [18, 37],
              "duplicate": [24, 39]}
    for kind, used, inconsistent, eval_used in (("reward", 32, {}, 15), ("cost", 30, {"inconsistent safety labels": [20, 35]}, 14)):
        s = json.loads((runs / kind / "data_summary.json").read_text())
        assert (s["train"]["rows_read"], s["train"]["rows_used"]) == (40, used)
        assert dropped(s["train"]) == {**common, **inconsistent}
        assert (s["eval"]["rows_read"], s["eval"]["rows_used"]) == (16, eval_used)
        assert dropped(s["eval"]) == {"prompt fills the window": [6], **({"inconsistent safety labels": [11]} if inconsistent else {})}
        counts = (15, 13, 4, 17) if kind == "reward" else (15, 11, 4, 17)   # both safe, one, none; better == safer
        assert [round(s["train"]["stats"][k] * used) for k in ("both_safe", "one_safe", "both_unsafe", "better_is_safer")] \
            == list(counts)
        assert s["eval"]["stats"]["also_in_train"] == 0
        assert json.loads((runs / kind / "eval.json").read_text())["step"] == 2   # evaluated on the test file
    s = json.loads((runs / "cost" / "data_summary.json").read_text())["eval"]["stats"]
    assert [round(s[k] * 14) for k in ("both_safe", "one_safe", "both_unsafe", "better_is_safer")] == [7, 5, 2, 7]

    # the run's guards: --strict, the same rows as evaluation, real data without a recipe
    line = refused(reward, *pair_args, "--strict", "--output_dir", runs / "strict")
    assert f"--strict: --dataset {pref_train} (split train) row 8: prompt fills the window" in line
    line = refused(reward, *[a for a in pair_args if a not in ("--eval_dataset", pref_test)], "--output_dir", runs / "same")
    assert f"--dataset {pref_train} is one file, so its split 'test' is the training rows" in line
    line = refused(cost, "--model_name_or_path", runs / "sft", "--dataset", REAL / "preference", "--output_dir", runs / "x")
    assert "is not the toy world's data: choose --recipe paper" in line
    assert not any((runs / name).exists() for name in ("strict", "same", "x"))

    # PPO-Lagrangian on the prompt file: the official recipe, PTX from the fixture's SFT rows
    p = stage("ppo_lagrangian.py", "--recipe", "paper", "--actor_model_name_or_path", runs / "sft",
              "--reward_model_name_or_path", runs / "reward", "--cost_model_name_or_path", runs / "cost",
              "--dataset", REAL / "prompts", "--ptx_dataset", REAL / "sft" / "train.jsonl", "--max_steps", 2,
              "--per_device_prompt_batch_size", 4, "--per_device_train_batch_size", 2, "--output_dir", runs / "ppo",
              "--sample_every", 0, *SMALL)
    assert "tokens/s" in p.stdout and "rl_steps/s" in p.stdout and "trained: 2 steps" in p.stdout
    s = json.loads((runs / "ppo" / "data_summary.json").read_text())["train"]
    assert (s["rows_read"], s["rows_used"]) == (20, 17)
    assert dropped(s) == {"duplicate": [2, 5], "empty prompt": [12]}   # repeats keep the last position, as upstream
    assert isinstance(s["stats"]["truncated_prompts"], int)              # kept, their first tokens cut
    ptx = json.loads((runs / "ppo" / "data_summary.json").read_text())["ptx"]   # PTX rows: no de-duplication
    assert (ptx["rows_read"], ptx["rows_used"]) == (24, 22)
    assert dropped(ptx) == {"empty response": [9], "prompt fills the window": [15]}
    records = [json.loads(x) for x in (runs / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["perf/eta_s"] >= 0 for r in records)

    # evaluate: Table 1 on the test file, through the same loader (drops counted, not fatal)
    stage("evaluate.py", "--policies", f"sft={runs / 'sft'}", f"ppo={runs / 'ppo'}", "--reward_model", runs / "reward",
          "--cost_model", runs / "cost", "--prompts", REAL / "prompts" / "train.jsonl", "--split", "train",
          "--preference_dataset", pref_test, "--max_new_tokens", 8, "--max_length", 256, "--output_dir", runs / "eval")
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert results["preference"]["reward"]["n_pairs"] == 15 and results["preference"]["cost"]["n_pairs"] == 14
    data = results["data"]   # evaluate.py's summaries: its prompts (first copy kept) and the pairs each model reads
    assert dropped(data["prompts"]) == {"duplicate": [9, 16], "empty prompt": [12]}
    assert isinstance(data["prompts"]["stats"]["truncated_prompts"], int)
    assert data["preference_reward"]["rows_used"] == 15 and data["preference_cost"]["rows_used"] == 14


@pytest.mark.parametrize("module", [sft, reward, cost, ppo_lagrangian, evaluate])
def test_help_is_clean(module, capsys):
    for argv in (["--help"], ["--recipe", "paper", "--help"]) if hasattr(module.Args, "PAPER") else (["--help"],):
        with pytest.raises(SystemExit) as e:
            plumbing.parse_args(module.Args, argv, description=module.__doc__.splitlines()[0])
        text = capsys.readouterr().out
        assert e.value.code == 0 and "usage:" in text
        assert not any(bad in text for bad in ("{'", "Traceback", "ClassVar", "(default: None)", "%(")), text
        if argv[0] == "--recipe":  # the official values are the defaults shown, and listed at the end
            official = module.Args.PAPER
            assert f"--recipe paper ({module.Args.PAPER_SOURCE}) sets:" in text
            assert all(f"--{k}" in text.split("sets:")[1] for k in official)
            assert f"(default: {official['lr' if 'lr' in official else 'actor_lr']})" in " ".join(text.split())
