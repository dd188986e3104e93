"""Wrong input is refused before anything is written: a model in the wrong slot, a tokenizer with
the same size but another mapping, weights that do not fit their config, a corrupt weights file,
labels that are not booleans or ids, text fields that are not text. Each probe runs the stage as a
user does and asserts: exit code 2, one line that names the flag, file or row, no traceback, and an
existing run folder next to it byte-identical afterwards."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

import cost
import data_rules
import plumbing
from conftest import ROOT, make_toy_checkpoints, run
from plumbing import UserError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Toy data and tiny sft / reward / cost checkpoints, plus broken copies of them."""
    root = tmp_path_factory.mktemp("refusals")
    data = make_toy_checkpoints(root)
    # the reward model's tokenizer with two tokens' ids swapped: same size, another mapping
    shutil.copytree(root / "reward", root / "reward_other_tok")
    tok = json.loads((root / "reward_other_tok" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "bread", "dough"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (root / "reward_other_tok" / "tokenizer.json").write_text(json.dumps(tok))
    # a policy whose config names another architecture: its weights do not fit
    shutil.copytree(root / "sft", root / "sft_gpt2")
    cfg = json.loads((root / "sft_gpt2" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (root / "sft_gpt2" / "config.json").write_text(json.dumps(cfg))
    # a policy whose weights file was cut short
    shutil.copytree(root / "sft", root / "sft_truncated")
    weights = root / "sft_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    # preference and SFT files with one bad row (row 3)
    pref = [json.loads(line) for line in (data / "preference" / "test.jsonl").read_text().splitlines()[:40]]
    sft_rows = [json.loads(line) for line in (data / "sft" / "test.jsonl").read_text().splitlines()[:40]]
    prompt_rows = [json.loads(line) for line in (data / "prompts" / "train.jsonl").read_text().splitlines()[:40]]
    for name, rows, field, value in (("safe_maybe", pref, "is_response_0_safe", "maybe"),
                                     ("safe_2", pref, "is_response_1_safe", 2),
                                     ("safer_none", pref, "safer_response_id", "none"),
                                     ("better_2", pref, "better_response_id", 2),
                                     ("response_list", pref, "response_1", ["a", "b"]),
                                     ("output_int", sft_rows, "output", 7),
                                     ("instruction_dict", sft_rows, "instruction", {"x": 1}),
                                     ("prompt_int", prompt_rows, "prompt", 12)):
        bad = [dict(r) for r in rows]
        bad[3][field] = value
        (root / name).mkdir()
        for split in ("train", "test"):
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (root / "not_utf8").mkdir()
    for split in ("train", "test"):
        (root / "not_utf8" / f"{split}.jsonl").write_bytes(
            (data / "preference" / "test.jsonl").read_bytes()[:2000].rsplit(b"\n", 1)[0] + b"\n"
            + b'{"prompt": "caf\xe9", "response_0": "a", "response_1": "b", "better_response_id": 0}\n')
    # an earlier run's folder that a refused run must leave alone
    shutil.copytree(root / "sft", root / "previous_run")
    (root / "previous_run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


def folder_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


PPO = ["--epochs", "1", "--limit", "16", "--per_device_prompt_batch_size", "8", "--per_device_train_batch_size", "8",
       "--max_length", "48", "--threshold", "-1"]


def probes(r):
    """(name, command line, fragments the one line must contain)."""
    models = {"--actor_model_name_or_path": r / "sft", "--reward_model_name_or_path": r / "reward",
              "--cost_model_name_or_path": r / "cost"}

    def ppo(**swap):
        m = dict(models, **{f"--{k}": v for k, v in swap.items()})
        return ["ppo_lagrangian.py", *[x for kv in m.items() for x in kv], "--dataset", r / "toy" / "prompts", *PPO]

    evaluate = ["evaluate.py", "--prompts", r / "toy" / "eval" / "prompts.jsonl", "--limit", "4", "--max_new_tokens", "4",
                "--preference_dataset", r / "toy" / "preference", "--preference_limit", "8"]
    return [
        ("cost model as the reward model", ppo(reward_model_name_or_path=r / "cost"),
         ["--reward_model_name_or_path", "is a cost model", "takes a reward model"]),
        ("policy as the cost model", ppo(cost_model_name_or_path=r / "sft"),
         ["--cost_model_name_or_path", "is a policy model", "takes a cost model"]),
        ("reward model as the actor", ppo(actor_model_name_or_path=r / "reward"),
         ["--actor_model_name_or_path", "is a reward model"]),
        ("reward model with another tokenizer", ppo(reward_model_name_or_path=r / "reward_other_tok"),
         ["--reward_model_name_or_path", "reward_other_tok", "another tokenizer"]),
        ("evaluate: reward model as the cost model", [*evaluate, "--policies", f"sft={r / 'sft'}", "--reward_model",
                                                       r / "reward", "--cost_model", r / "reward"],
         ["--cost_model", "is a reward model"]),
        ("evaluate: cost model as a policy", [*evaluate, "--policies", f"sft={r / 'cost'}", "--reward_model",
                                              r / "reward", "--cost_model", r / "cost"],
         ["--policies", "is a cost model"]),
        ("reward.py from a cost model", ["reward.py", "--model_name_or_path", r / "cost", "--dataset",
                                         r / "toy" / "preference", "--limit", "16"],
         ["--model_name_or_path", "is a cost model", "takes a policy or reward model"]),
        ("weights of another architecture", ["sft.py", "--model_name_or_path", r / "sft_gpt2", "--dataset",
                                             r / "toy" / "sft", "--limit", "64"],
         ["sft_gpt2", "missing weights", "not this architecture"]),
        ("truncated weights file", ["sft.py", "--model_name_or_path", r / "sft_truncated", "--dataset",
                                    r / "toy" / "sft", "--limit", "64"],
         ["cannot load model from", "sft_truncated"]),
        ("safety label 'maybe'", ["cost.py", "--model_name_or_path", r / "sft", "--dataset", r / "safe_maybe"],
         ["safe_maybe", "row 3", "is_response_0_safe", "'maybe'"]),
        ("response id 2", ["reward.py", "--model_name_or_path", r / "sft", "--dataset", r / "better_2"],
         ["better_2", "row 3", "better_response_id must be 0 or 1"]),
        ("output that is not text", ["sft.py", "--model_name_or_path", r / "sft", "--dataset", r / "output_int"],
         ["output_int", "row 3", "'output' must be text"]),
        ("safety label 2", ["cost.py", "--model_name_or_path", r / "sft", "--dataset", r / "safe_2"],
         ["safe_2", "row 3", "is_response_1_safe must be true/false or 1/0, got 2"]),
        ("safer id 'none'", ["cost.py", "--model_name_or_path", r / "sft", "--dataset", r / "safer_none"],
         ["safer_none", "row 3", "safer_response_id must be 0 or 1"]),
        ("a response that is a list", ["reward.py", "--model_name_or_path", r / "sft", "--dataset", r / "response_list"],
         ["response_list", "row 3", "'response_1' must be text"]),
        ("an instruction that is a dict", ["sft.py", "--model_name_or_path", r / "sft", "--dataset",
                                           r / "instruction_dict"], ["instruction_dict", "row 3", "'instruction' must be text"]),
        ("a prompt that is a number", ["ppo_lagrangian.py", *[x for kv in models.items() for x in kv], "--dataset",
                                       r / "prompt_int", *PPO],
         ["prompt_int", "row 3", "'prompt' must be text"]),
        ("bytes that are not UTF-8", ["reward.py", "--model_name_or_path", r / "sft", "--dataset", r / "not_utf8"],
         ["not_utf8", "line", "not UTF-8 text"]),
        ("a tokenizer folder that does not exist", ["sft.py", "--model_name_or_path", "toy-tiny", "--tokenizer_name_or_path",
                                                    r / "no_such_tokenizer", "--dataset", r / "toy" / "sft"],
         ["no_such_tokenizer", "does not exist"]),
        ("a checkpoint folder that does not exist", ["reward.py", "--model_name_or_path", r / "no_such_sft", "--dataset",
                                                     r / "toy" / "preference"], ["no_such_sft", "does not exist"]),
        ("evaluate: a policy given twice", [*evaluate, "--policies", f"a={r / 'sft'}", f"a={r / 'sft'}", "--reward_model",
                                            r / "reward", "--cost_model", r / "cost"], ["--policies", "'a' is given twice"]),
    ]


def probe_problems(name, p, fragments, folder, before) -> list[str]:
    """What is wrong with one refused run: anything but exit 2, one `error:` line holding every
    fragment, no traceback, and the run folder next to it unchanged."""
    last = (p.stderr.strip().splitlines() or [""])[-1]
    problems = [f"exit {p.returncode}" if p.returncode != 2 else "",
                "a traceback" if "Traceback" in p.stderr else "",
                f"line {last!r} lacks {[f for f in map(str, fragments) if f not in last]}"
                if not last.startswith("error: ") or not all(f in last for f in map(str, fragments)) else "",
                "the run folder changed" if folder_digest(folder) != before else ""]
    return [f"{name}: {x}\n{p.stderr[-1500:]}" for x in problems if x]


def run_probes(cases, tmp_path, ckpt):
    """Run (name, command, fragments, extra flags) probes 3 at a time, each next to its own copy of an
    earlier run's folder (a probe that gets as far as claiming it holds its lock)."""
    def one(i):
        name, cmd, fragments, extra = cases[i]
        folder = tmp_path / f"run_{i}"
        shutil.copytree(ckpt / "previous_run", folder)
        before = folder_digest(folder)
        # evaluate.py refuses a training run's folder anyway (it replaces only its own results): give it a new one
        out = tmp_path / f"results_{i}" if cmd[0] == "evaluate.py" else folder
        recipe = [] if cmd[0] == "evaluate.py" else ["--recipe", "toy"]  # the probes' own data are not the toy world's
        p = run([sys.executable, *cmd, "--output_dir", out, *recipe, *extra], cwd=ROOT)
        problems = probe_problems(name, p, fragments, folder, before)
        return problems + ([f"{name}: {out} was created"] if cmd[0] == "evaluate.py" and out.exists() else [])
    with ThreadPoolExecutor(3) as pool:
        problems = [x for found in pool.map(one, range(len(cases))) for x in found]
    assert not problems, "\n".join(problems)


def test_wrong_input_is_one_line_and_leaves_the_run_folder_alone(ckpt, tmp_path):
    # --overwrite: each probe gets past the folder check, and even so nothing may change before validation
    cases = [(name, cmd, fragments, [] if cmd[0] == "evaluate.py" else ["--overwrite"])
             for name, cmd, fragments in probes(ckpt)]
    assert len(cases) == 21
    run_probes(cases, tmp_path, ckpt)


def test_safety_labels_are_parsed_not_cast():
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": 0}
    for safe_0, safe_1, signs in ((True, False, [-1.0, 1.0]), ("true", "false", [-1.0, 1.0]),
                                  ("False", "FALSE", [1.0, 1.0]), (1, 0, [-1.0, 1.0]), ("1", "0", [-1.0, 1.0]),
                                  (0, 0, [1.0, 1.0]), ("true", "True", [-1.0, -1.0])):
        _, _, got = cost.safer_unsafer(dict(row, is_response_0_safe=safe_0, is_response_1_safe=safe_1), "row 0")
        assert got == signs, (safe_0, safe_1)   # bool("false") would have made "false" safe
    for bad in ("maybe", "", 2, None, "yes please"):
        with pytest.raises(UserError, match="row 0: is_response_0_safe must be true/false or 1/0"):
            cost.safer_unsafer(dict(row, is_response_0_safe=bad, is_response_1_safe=True), "row 0")


def test_response_ids_accept_0_and_1_only():
    assert [data_rules.parse_id(v, "x") for v in (0, 1, "0", "1", 0.0, 1.0)] == [0, 1, 0, 1, 0, 1]
    for bad in (2, -1, "2", "one", True, None, 0.5):
        with pytest.raises(UserError, match="x must be 0 or 1"):
            data_rules.parse_id(bad, "x")


def test_a_run_folder_belongs_to_one_run(ckpt, tmp_path):
    """A fresh run into a folder that holds a run is refused without --overwrite; two runs into one
    folder at once: the second is refused naming the first's pid, and the first finishes unharmed."""
    before = folder_digest(ckpt / "previous_run")
    p = run([sys.executable, "sft.py", "--model_name_or_path", ckpt / "sft", "--dataset", ckpt / "toy" / "sft",
             "--output_dir", ckpt / "previous_run"], cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --output_dir") and "already holds a run: --resume to continue it, --overwrite" in line
    assert folder_digest(ckpt / "previous_run") == before
    out = tmp_path / "busy"
    cmd = [sys.executable, "sft.py", "--model_name_or_path", "toy-tiny", "--tokenizer_name_or_path",
           ckpt / "toy" / "tokenizer", "--dataset", ckpt / "toy" / "sft", "--limit", "512", "--epochs", "4",
           "--per_device_train_batch_size", "8", "--toy_eval_samples", "0", "--eval_limit", "16", "--log_every", "1",
           "--output_dir", out]
    first = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    try:
        lock = tmp_path / "busy.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.read_text().strip() == str(first.pid)
        second = run([*cmd, "--overwrite"], cwd=ROOT)
        assert first.poll() is None, "the first run ended before the second tried: make it longer"
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another run (pid {first.pid})" in second.stderr.strip().splitlines()[-1]
        _, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 257))   # the first run's, once each
    assert not lock.exists()   # released when the run ended


def test_resume_refuses_changed_settings_and_global_batches(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps({"lr": 0.001, "seed": 42, "log_every": 10, "output_dir": "x",
                                                  "per_device_train_batch_size": 4}))
    state = {"rank0.rng.python": [3, [0], None], "rank1.rng.python": [3, [0], None]}  # written by 2 ranks
    (folder / "train_state.json").write_text(json.dumps(state))
    save_file({"x": torch.zeros(1)}, str(folder / "train_state.safetensors"))

    @dataclasses.dataclass
    class Args:  # the fields open_run_folder reads, as a stage's Args has them
        output_dir: str = str(folder)
        resume: bool = True
        overwrite: bool = False
        lr: float = 0.001
        seed: int = 42
        log_every: int = 1
        per_device_train_batch_size: int = 4
    with pytest.raises(UserError, match=r"global batch .* was 8 \(4 x 2\), now 4; pass --per_device_train_batch_size 8"):
        plumbing.open_run_folder(Args(), world_size=1, is_main=True)   # 2 ranks saved it: the global batch would halve
    lock, _ = plumbing.open_run_folder(Args(per_device_train_batch_size=8), world_size=1, is_main=True)
    lock.close()                                                        # another number of ranks, the same global batch
    lock, got = plumbing.open_run_folder(Args(), world_size=2, is_main=True)   # log_every may change
    lock.close()
    assert got["json"] == state
    with pytest.raises(UserError, match=r"--resume: --lr was 0.001 in the interrupted run, now 0.01"):
        plumbing.open_run_folder(Args(lr=0.01), world_size=2, is_main=True)
    with pytest.raises(UserError, match=r"--seed was 42 .* now 7"):
        plumbing.open_run_folder(Args(seed=7), world_size=2, is_main=True)


def test_trim_logs_keeps_each_step_once(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 4, 8, 12, 16)))
    plumbing.trim_logs(tmp_path, 8)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 4, 8]


def test_non_finite_weights_are_never_saved(ckpt, tmp_path):
    import model as M

    tok = M.load_tokenizer(ckpt / "toy" / "tokenizer", "right")
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    policy = M.load_causal_lm(str(ckpt / "sft"), tok)
    M.save_checkpoint(tmp_path / "run", d, tok, {"": policy})
    before = folder_digest(tmp_path / "run")
    with torch.no_grad():
        policy.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"the weight model.layers.0.mlp.up_proj.weight is not finite; nothing saved"):
        M.save_checkpoint(tmp_path / "run", d, tok, {"": policy})
    assert folder_digest(tmp_path / "run") == before
    assert not list(tmp_path.glob("run.tmp-*"))


def test_resumed_run_logs_each_step_once(ckpt, tmp_path):
    """The killed run had logged steps 3 and 4 after its checkpoint at step 2 (appended here, as a
    kill -9 between a log line and the next save leaves them); the resumed run redoes 3 and 4."""
    cmd = [sys.executable, "sft.py", "--model_name_or_path", "toy-tiny", "--tokenizer_name_or_path",
           ckpt / "toy" / "tokenizer", "--dataset", ckpt / "toy" / "sft", "--limit", "64", "--eval_limit", "16",
           "--epochs", "1", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
           "--log_every", "1", "--toy_eval_samples", "0", "--output_dir", tmp_path / "run"]
    p = run([*cmd, "--stop_at_step", "2"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        for step in (3, 4):
            f.write(json.dumps({"step": step, "train/loss": 9.9}) + "\n")
    p = run([*cmd, "--resume"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [1, 2, 3, 4] and all(r["train/loss"] != 9.9 for r in records if "train/loss" in r)
    p = run([*cmd, "--resume", "--lr", "0.5"], cwd=ROOT)   # a changed setting is refused
    assert p.returncode == 2 and "--resume: --lr was" in p.stderr.strip().splitlines()[-1]


NUMBER_PROBES = [  # (stage, flag, value, what the line says)
    ("sft.py", "--per_device_train_batch_size", "-1", ">= 1"), ("sft.py", "--epochs", "0", ">= 1e-06"),
    ("sft.py", "--gradient_accumulation_steps", "0", ">= 1"), ("sft.py", "--max_length", "0", ">= 2"),
    ("sft.py", "--lr", "nan", "finite"), ("sft.py", "--lr", "-0.1", ">= 0"), ("sft.py", "--warmup_ratio", "1.5", "between 0 and 1"),
    ("reward.py", "--per_device_eval_batch_size", "0", ">= 1"), ("reward.py", "--regularization", "-1", ">= 0"),
    ("reward.py", "--lr", "inf", "finite"), ("cost.py", "--epochs", "-3", ">= 1e-06"),
    ("ppo_lagrangian.py", "--lambda_init", "-1", ">= 0"), ("ppo_lagrangian.py", "--gamma", "1.5", "between 0 and 1"),
    ("ppo_lagrangian.py", "--kl_coeff", "nan", "finite"), ("ppo_lagrangian.py", "--update_iters", "0", ">= 1"),
    ("ppo_lagrangian.py", "--episode_cost_window_size", "0", ">= 1"), ("evaluate.py", "--batch_size", "0", ">= 1"),
    ("evaluate.py", "--samples_per_prompt", "0", ">= 1"),
]


def test_nonsense_numbers_are_refused_at_parse_time(ckpt, tmp_path):
    """In-process (parse time: nothing is read or written yet); one probe as a user runs it."""
    import importlib
    for stage, flag, value, says in NUMBER_PROBES:
        module = importlib.import_module(stage.removesuffix(".py"))
        with pytest.raises(UserError) as e:
            plumbing.parse_args(module.Args, [flag, value, "--output_dir", str(tmp_path / "never")])
        assert str(e.value).startswith(f"{flag} ") and "must be a finite number" in str(e.value) and says in str(e.value), \
            (stage, flag, value, str(e.value))
    assert not (tmp_path / "never").exists()
    stage, flag, value, says = NUMBER_PROBES[0]
    run_probes([(f"{stage} {flag} {value}", [stage, flag, value], [f"error: {flag} ", "must be a finite number", says], [])],
               tmp_path, ckpt)


def test_ppo_batch_sizes_that_do_not_divide_are_one_line(ckpt):
    p = run([sys.executable, "ppo_lagrangian.py", "--per_device_prompt_batch_size", "12",
             "--per_device_train_batch_size", "8", "--output_dir", ckpt / "previous_run"], cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--per_device_prompt_batch_size 12 must be a multiple of --per_device_train_batch_size 8" in p.stderr


def test_trim_logs_drops_the_half_line_a_kill_leaves(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"note": "no step"}\n{"step": 3}\n{"step": 4, "trai')
    plumbing.trim_logs(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"note": "no step"}\n{"step": 3}\n'


def test_limits_take_huge_integers_and_refuse_zero_temperature():
    import ppo_lagrangian

    args = plumbing.parse_args(ppo_lagrangian.Args, ["--limit", str(10 ** 400)])
    assert args.limit == 10 ** 400
    for flag in ("--temperature", "--lambda_max"):
        with pytest.raises(UserError, match=f"{flag} 0.0: must be a finite number >= 1e-06"):
            plumbing.parse_args(ppo_lagrangian.Args, [flag, "0"])
