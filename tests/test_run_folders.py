"""Never lose a file the project did not write. An output folder is new, empty, or the project's
(its marker, .nano_safe_rlhf.json, lists what it wrote); anything else is refused in one line before
anything is read or written, by every stage, --overwrite or not. A save never removes a user's file,
a replaced run stays whole until the new one's first save, and the faults a careless user or a
failing machine brings (a full disk, a diverged run, a finished run resumed, a negative learning
rate in scientific notation, ...) are one line each, exit 2, nothing lost."""

import hashlib
import json
import os
import stat
import sys

import pytest
import torch

import cost
import evaluate
import data_rules
import plumbing
import ppo_lagrangian
import reward
import rloo_lagrangian
import rounds
import sft
from conftest import make_toy_checkpoints, run, torchrun
from plumbing import UserError


def digest(folder):
    """Every file and folder under `folder`, with its bytes' hash (folders: None)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def users_folder(path):
    """A folder of the user's own files: notes and a folder of photos."""
    (path / "photos").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folders")
    make_toy_checkpoints(root)
    return root


SFT = ["--limit", "16", "--epochs", "1", "--per_device_train_batch_size", "8", "--toy_eval_samples", "0",
       "--eval_limit", "8", "--max_length", "64"]
STAGES = {"sft": sft, "reward": reward, "cost": cost, "ppo_lagrangian": ppo_lagrangian,
          "rloo_lagrangian": rloo_lagrangian, "evaluate": evaluate, "rounds": rounds}


def run_stage(module, argv):
    """A stage's main, in this process, on a parsed command line (reward.py's is train(args, REWARD))."""
    args = plumbing.parse_args(module.Args, [str(a) for a in argv])
    return module.train(args, module.REWARD) if module is reward else module.main(args)


def stage_argv(name, toy, out):
    """A command line that would run the stage: only --output_dir is wrong."""
    data = toy / "toy"
    models = ["--actor_model_name_or_path", toy / "sft", "--reward_model_name_or_path", toy / "reward",
              "--cost_model_name_or_path", toy / "cost", "--dataset", data / "prompts", "--threshold", "-1"]
    argv = {"sft": ["--model_name_or_path", toy / "sft", "--dataset", data / "sft"],
            "reward": ["--model_name_or_path", toy / "sft", "--dataset", data / "preference"],
            "cost": ["--model_name_or_path", toy / "sft", "--dataset", data / "preference"],
            "ppo_lagrangian": models, "rloo_lagrangian": models,
            "evaluate": ["--policies", f"sft={toy / 'sft'}", "--reward_model", toy / "reward", "--cost_model", toy / "cost"],
            "rounds": ["--runs", toy, "--data", data, "--results_dir", toy / "never-results"]}[name]
    return [str(a) for a in argv] + ["--output_dir", str(out)]


@pytest.mark.parametrize("kind", ["user_files", "data_folder", "dot", "root", "home"])
def test_every_stage_refuses_a_folder_it_did_not_write(toy, tmp_path, monkeypatch, kind):
    """--output_dir on a folder of the user's files, a data folder, ".", "/" and "~": every training
    stage, evaluate.py and rounds.py refuse it in one line, with and without --overwrite, and every
    file there is byte-identical afterwards."""
    target = {"user_files": lambda: users_folder(tmp_path / "mine"),
              "data_folder": lambda: toy / "toy" / "sft",
              "dot": lambda: users_folder(tmp_path / "cwd"),
              "root": lambda: None,
              "home": lambda: users_folder(tmp_path / "home")}[kind]()
    flag = {"dot": ".", "root": "/", "home": "~"}.get(kind, str(target))
    if kind == "dot":
        monkeypatch.chdir(target)
    if kind == "home":
        monkeypatch.setenv("HOME", str(target))
    before = digest(target) if target else None
    for name, module in STAGES.items():
        for extra in ([], ["--overwrite"]):
            if name == "evaluate" and extra:
                continue  # evaluate.py has no --overwrite: it only ever replaces its own results
            with pytest.raises(UserError) as e:
                run_stage(module, stage_argv(name, toy, flag) + extra)
            message = str(e.value)
            assert "\n" not in message and ("--output_dir" in message), (name, message)
            assert ("did not write" in message or "not a rounds.py folder" in message
                    or "file-system root" in message), (name, message)
    if target:
        assert digest(target) == before
        assert not (target.parent / (target.name + ".lock")).exists()


def test_a_save_never_removes_a_users_file(tmp_path):
    """Files the user drops into a run folder survive every later save (carried into the new folder,
    never overwritten); files the project wrote before and not now are dropped; the marker lists only
    the project's names; files are readable by the team (0666 less the umask, not 0600)."""
    folder = tmp_path / "run"
    with plumbing.atomic_folder(folder) as tmp:
        (tmp / "model-00001-of-00002.safetensors").write_text("old shard")
        (tmp / "config.json").write_text("{}")
    users_folder(folder)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    mine = {k: v for k, v in digest(folder).items() if k.startswith(("notes", "photos"))}
    with plumbing.atomic_folder(folder) as tmp:
        (tmp / "model.safetensors").write_text("new weights")
        (tmp / "config.json").write_text('{"new": 1}')
    after = digest(folder)
    assert {k: v for k, v in after.items() if k.startswith(("notes", "photos"))} == mine
    assert "model-00001-of-00002.safetensors" not in after                    # the project's own old file
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1}\n'           # a log is carried over
    marker = json.loads((folder / plumbing.MARKER).read_text())
    assert marker["files"] == ["config.json", "metrics.jsonl", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    # a kill between the swap and the carry: the next start moves the user's files across
    old = folder.with_name("run.old")
    folder.rename(old)
    with plumbing.atomic_folder(tmp_path / "fresh") as tmp:
        (tmp / "config.json").write_text("{}")
    (tmp_path / "fresh").rename(folder)
    plumbing.recover_checkpoint(folder)
    assert not old.exists() and (folder / "notes.txt").read_text() == "my notes\n"
    assert (folder / "photos" / "a.jpg").is_file()


def test_overwrite_replaces_a_run_only_at_its_first_save(tmp_path):
    """--overwrite moves the old run's files aside (the user's stay) when the new run begins; a new run
    that fails before its first save puts them back (the folder never mixes two runs); the first save
    drops them."""
    folder = tmp_path / "run"
    with plumbing.atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text('{"run": "old"}')
    (folder / "args.json").write_text('{"output_dir": "old"}')
    (folder / "notes.txt").write_text("mine")
    before = digest(folder)
    args = type("A", (), {"output_dir": str(folder), "resume": False, "overwrite": True})()
    plumbing.begin_run_folder(args)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / "args.json").write_text('{"output_dir": "new"}')     # the new run's files, then it fails
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    plumbing.end_replacements(succeeded=False)
    assert digest(folder) == before and not folder.with_name("run.replaced").exists()
    plumbing.begin_run_folder(args)                  # again; this time it saves
    (folder / "args.json").write_text('{"output_dir": "new"}')
    with plumbing.atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text('{"run": "new"}')
    assert not folder.with_name("run.replaced").exists()
    assert json.loads((folder / "config.json").read_text()) == {"run": "new"}
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "args.json").read_text()) == {"output_dir": "new"}


def test_a_failed_overwrite_leaves_the_finished_run_whole(toy, tmp_path):
    """A finished SFT run, then `--overwrite` with settings that diverge at step 2: the folder is the
    finished run's, byte for byte (its args.json, logs and weights), and the user's file is kept."""
    out = tmp_path / "sft"
    base = ["--model_name_or_path", toy / "sft", "--dataset", toy / "toy" / "sft", *SFT, "--output_dir", out]
    p = run([sys.executable, "sft.py", *base])
    assert p.returncode == 0, p.stderr[-2000:]
    (out / "notes.txt").write_text("mine")
    before = digest(out)
    p = run([sys.executable, "sft.py", *base, "--overwrite", "--lr", "1e30", "--lr_scheduler_type", "constant"])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "not finite" in p.stderr.strip().splitlines()[-1] or "diverged" in p.stderr.strip().splitlines()[-1]
    assert digest(out) == before
    p = run([sys.executable, "sft.py", *base, "--resume"])        # resuming a finished run: nothing to do
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "holds a finished run" in p.stderr.strip().splitlines()[-1]
    assert digest(out) == before


def test_torchrun_users_read_the_one_line_last(toy, tmp_path):
    """Under torchrun every rank refuses in one line, and torchrun's own closing summary (its root
    cause) repeats that line instead of pointing to its docs."""
    mine = users_folder(tmp_path / "mine")
    p = torchrun(2, ["sft.py", "--model_name_or_path", toy / "sft", "--dataset", toy / "toy" / "sft",
                     "--output_dir", mine], timeout=120)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    summary = out[out.rindex("Root Cause"):]
    assert "error: --output_dir" in summary and "did not write" in summary
    assert (mine / "notes.txt").read_text() == "my notes\n"


def test_a_full_disk_on_the_second_save_keeps_the_first(toy, tmp_path, monkeypatch):
    """A disk that fills up during a later save: one line naming the folder, and the previous
    checkpoint is intact (the failing write went to a temporary folder)."""
    import safetensors.torch

    real = safetensors.torch.serialize_file
    out = tmp_path / "sft"

    def fill_up(tensors, filename, metadata=None):
        if (out / "config.json").exists():  # a checkpoint is there: this is a later save
            raise safetensors.SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", fill_up)
    args = plumbing.parse_args(sft.Args, [str(a) for a in ["--model_name_or_path", toy / "sft", "--dataset",
                                                             toy / "toy" / "sft", *SFT, "--limit", "32",
                                                             "--save_every", "1", "--output_dir", out]])
    with pytest.raises(UserError, match=r"^cannot save to .*: No space left on device; it keeps its previous checkpoint$"):
        sft.main(args)
    state = json.loads((out / "train_state.json").read_text())
    assert state["trainer"]["step"] == 1 and (out / "model.safetensors").stat().st_size > 0
    assert not list(tmp_path.glob("sft.tmp-*"))


def test_diverged_but_finite_weights_are_never_saved(toy, tmp_path):
    """Weights of ~1e30 are finite; more than WEIGHT_GROWTH_LIMIT times the model's largest weight at
    load time they are a diverged run, refused naming a weight, the previous checkpoint kept."""
    import model as M

    tok = M.load_tokenizer(toy / "toy" / "tokenizer", "right")
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    policy = M.prepare_model(M.load_causal_lm(str(toy / "sft"), tok), d, trainable=True, bf16=False)
    assert 1.0 <= policy.initial_weight_scale < 100
    M.save_checkpoint(tmp_path / "c", d, tok, {"": policy})
    before = digest(tmp_path / "c")
    with torch.no_grad():
        policy.model.layers[0].mlp.up_proj.weight[0, 0] = 1e30
    with pytest.raises(UserError, match=r"model.layers.0.mlp.up_proj.weight reached 1e\+30.*diverged"):
        M.save_checkpoint(tmp_path / "c", d, tok, {"": policy})
    assert digest(tmp_path / "c") == before
    with torch.no_grad():   # a weight that grew 100-fold is training, not divergence
        policy.model.layers[0].mlp.up_proj.weight[0, 0] = 100 * policy.initial_weight_scale
    M.save_checkpoint(tmp_path / "c", d, tok, {"": policy})


def test_numbers_argparse_mistook_or_float32_cannot_hold_are_one_line():
    with pytest.raises(UserError, match=r"^--lr -0.001: must be a finite number >= 0$"):
        plumbing.parse_args(sft.Args, ["--lr", "-1e-3"])
    with pytest.raises(UserError, match=r"^--lr 1e\+39: must be a finite number \(within float32\) >= 0$"):
        plumbing.parse_args(sft.Args, ["--lr", "1e39"])
    assert plumbing.parse_args(sft.Args, ["--lr", "2e-5"]).lr == 2e-5
    assert plumbing.parse_args(ppo_lagrangian.Args, ["--threshold", "-1e-1"]).threshold == -0.1


def test_a_max_length_past_the_models_positions_is_refused(toy, tmp_path):
    """Rows of ~1,000 tokens with --max_length 2048 on a model of 256 positions: refused in one line
    (the rows would use positions the model never learnt); a rollout that may reach --max_length is
    refused whatever the data. Toy rows are short: the toy default --max_length 512 stays valid."""
    positions = json.loads((toy / "sft" / "config.json").read_text())["max_position_embeddings"]
    long_answer = " ".join(["knead the dough first then bake it"] * 150)           # ~1,000 tokens
    sft_rows = [{"instruction": f"how do i bake bread {i}", "input": "", "output": long_answer} for i in range(16)]
    pref_rows = [{"prompt": f"how do i bake bread {i}", "response_0": long_answer, "response_1": "sorry",
                  "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": True,
                  "is_response_1_safe": True} for i in range(16)]
    for name, rows in (("sft", sft_rows), ("pref", pref_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = ((sft, ["--model_name_or_path", toy / "sft", "--dataset", tmp_path / "sft.jsonl", "--eval_split", ""]),
             (reward, ["--model_name_or_path", toy / "sft", "--dataset", tmp_path / "pref.jsonl", "--eval_split", ""]),
             (ppo_lagrangian, stage_argv("ppo_lagrangian", toy, tmp_path / "p")[:-2] + ["--per_device_prompt_batch_size", 4]))
    for module, argv in cases:
        out = tmp_path / module.__name__
        with pytest.raises(UserError, match=rf"^--max_length 2048 (lets sequences reach \d+ tokens, which )?exceeds "
                                            rf"the model's {positions} positions .*use --max_length {positions} or less$"):
            run_stage(module, argv + ["--max_length", 2048, "--output_dir", out, "--limit", 16, "--recipe", "toy",
                                      "--per_device_train_batch_size", 4])
        assert not out.exists()


def test_malformed_rows_and_blank_prompts_are_named(toy, tmp_path):
    rows = (toy / "toy" / "sft" / "train.jsonl").read_text().splitlines()[:8]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:2] + ['{"instruction": "x", "output": ' ] + rows[3:]) + "\n")
    with pytest.raises(UserError, match=rf"^--dataset {bad} line 3: not a JSON row \("):
        data_rules.load_rows(str(bad), "train")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("  ", "\t", "\n")))
    out = tmp_path / "never"
    argv = stage_argv("ppo_lagrangian", toy, out)
    argv[argv.index("--dataset") + 1] = str(blank)
    with pytest.raises(UserError, match=r"no usable row.*empty prompt"):
        ppo_lagrangian.main(plumbing.parse_args(ppo_lagrangian.Args, argv + ["--recipe", "toy"]))
    assert not out.exists()


def test_a_policy_in_the_cost_models_slot_is_named_as_one(toy, tmp_path):
    argv = stage_argv("ppo_lagrangian", toy, tmp_path / "never")
    argv[argv.index("--cost_model_name_or_path") + 1] = str(toy / "sft")
    with pytest.raises(UserError, match=r"--cost_model_name_or_path .* is a policy"):
        ppo_lagrangian.main(plumbing.parse_args(ppo_lagrangian.Args, argv))


def test_rounds_checks_the_flags_it_passes_before_any_round(toy, tmp_path):
    out, results = tmp_path / "rounds", tmp_path / "results"
    for flag, value, named in (("--ppo_args", "--actor_lr -1", "--ppo_args: --actor_lr -1"),
                               ("--preference_args", "--bogus 1", "--preference_args:"),
                               ("--evaluate_args", "--limit 0", "--evaluate_args: --limit 0")):
        argv = ["--runs", str(toy), "--data", str(toy / "toy"), "--output_dir", str(out), "--results_dir", str(results),
                f"{flag}={value}"]
        with pytest.raises(UserError) as e:
            rounds.main(plumbing.parse_args(rounds.Args, argv))
        assert str(e.value).startswith(named), str(e.value)
        assert not out.exists() and not results.exists()


def test_toyworld_out_on_a_users_folder_is_one_line(tmp_path):
    mine = users_folder(tmp_path / "mine")
    before = digest(mine)
    p = run([sys.executable, "toyworld.py", "--out", mine])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: toyworld: {mine} exists and is not a toy-world folder (no card.json); not touching it"
    assert digest(mine) == before


def test_a_lock_in_a_folder_made_read_only_is_left_quietly(tmp_path):
    """Releasing the lock at exit cannot fail loudly: the folder beside it may have become read-only
    (here the lock's path is taken by a folder, so unlinking it fails as it would there)."""
    lock = plumbing._lock(tmp_path / "run")
    path = tmp_path / "run.lock"
    path.unlink()
    path.mkdir()
    plumbing._release(lock)   # no exception
    assert lock.closed and lock not in plumbing._HELD


def test_an_evaluation_and_a_training_run_never_replace_each_other(toy, tmp_path):
    """Both are the project's folders, but evaluate.py replaces only an evaluation and a training stage
    only a run: `evaluate.py --output_dir runs/sft` would otherwise swap the SFT model for a table."""
    before = digest(toy / "sft")
    with pytest.raises(UserError, match=r"holds a training run, not an evaluation; not replacing it"):
        run_stage(evaluate, stage_argv("evaluate", toy, toy / "sft"))
    assert digest(toy / "sft") == before
    results = tmp_path / "results"
    with plumbing.atomic_folder(results, keep=(), kind="evaluation") as tmp:
        (tmp / "results.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds an evaluation, not a training run"):
        run_stage(sft, stage_argv("sft", toy, results) + ["--overwrite"])


def test_max_grad_norm_0_means_no_clipping():
    """Clipping to a norm of 0 would zero every gradient: a run that trains nothing, silently. 0 is off
    (as in HF's Trainer); the norm is still returned for the log."""
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(4, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = plumbing.clip_grad_norm(layer, 0)
    assert norm.item() == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())
    assert all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), grads))
    plumbing.clip_grad_norm(layer, norm.item() / 2)
    assert torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item() == pytest.approx(norm.item() / 2)
