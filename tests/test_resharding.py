"""Sharded checkpoints (every rank writes its own shards) and --resume on another number of ranks.

One SFT configuration throughout: 64 toy rows, a global batch of 16 sequences (per device 4 x 2 ranks
x 2 accumulation steps), 4 optimiser steps, a checkpoint after every step.
  A  2 ranks, uninterrupted.
  B  2 ranks, killed (SIGKILL, the whole torchrun) while its second checkpoint is being written;
     what is on disk is then the first, complete; --resume on 2 ranks ends bit-identical to A.
  B1, B4  copies of B's checkpoint resumed on 1 process (per device 8) and on 4 ranks (per device 2):
     the same global batches in the same order, only split differently, so they end where A ends up to
     float summation order (tolerance below).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import plumbing
from conftest import ROOT, free_port, run, torchrun
from plumbing import UserError

ROWS = ["--limit", "64", "--eval_limit", "16", "--epochs", "1", "--lr", "1e-3", "--log_every", "1",
        "--toy_eval_samples", "0", "--model_name_or_path", "toy-tiny", "--save_every", "1"]


def sft_args(toy, out, per_device, *extra):
    return ["sft.py", "--dataset", toy / "sft", "--tokenizer_name_or_path", toy / "tokenizer", "--output_dir", out,
            *ROWS, "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "2", *extra]


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import toyworld
    return toyworld.ensure_toy_data(tmp_path_factory.mktemp("reshard") / "toy")


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "run"
    ok(torchrun(2, sft_args(toy, out, 4), timeout=300))
    return out


def kill_all(marker: str) -> None:
    """SIGKILL torchrun and its workers at once (the workers run in sessions of their own): every
    process whose command line names `marker`, as a machine that loses power would."""
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def killed(toy, tmp_path_factory):
    """B: 2 ranks, SIGKILL to the whole torchrun while the step-2 checkpoint is being written (its
    temporary folder exists); returns the folder as the kill left it."""
    out = tmp_path_factory.mktemp("b") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *map(str, sft_args(toy, out, 4))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_in_save = time.time() + 240, False
    while time.time() < deadline and p.poll() is None:
        state = out / "train_state.json"
        step = json.loads(state.read_text())["trainer"]["step"] if state.is_file() else 0
        if step == 1 and any(out.parent.glob("run.tmp-*")):  # the second save is under way
            kill_all(str(out))
            killed_in_save = True
            break
        time.sleep(0.002)
    p.wait()
    if not killed_in_save:
        pytest.fail("the run ended before a kill could land in its second save")
    return out


def test_kill_during_a_sharded_save_then_resume_is_bit_identical(toy, uninterrupted, killed, tmp_path):
    b = tmp_path / "run"
    shutil.copytree(killed, b)
    for tmp in killed.parent.glob("run.tmp-*"):  # the half-written save, as the kill left it
        shutil.copytree(tmp, tmp_path / tmp.name)
    assert any(tmp_path.glob("run.tmp-*"))
    assert json.loads((b / "train_state.json").read_text())["trainer"]["step"] == 1   # the first save is current
    ok(torchrun(2, sft_args(toy, b, 4, "--resume"), timeout=300))
    assert not any(tmp_path.glob("run.tmp-*"))                     # the next start dropped the half-written save
    wa, wb = weights(uninterrupted), weights(b)
    assert sorted(wa) == sorted(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)            # bit for bit, as on one process
    assert (b / "train_state" / "optimizer" / "model.safetensors").is_file()   # the moments, whole


@pytest.mark.parametrize("ranks,per_device", [(1, 8), (4, 2)])
def test_resume_on_another_number_of_ranks(toy, uninterrupted, killed, tmp_path, ranks, per_device):
    """Saved by 2 ranks at step 1; resumed on `ranks` with the same global batch of 16; ends where the
    uninterrupted 2-rank run ends. Why not bit for bit: the same 16 rows per step are split into other
    micro-batches (other padding, other summation order of the token losses) and the gradients are
    reduced over another number of ranks, so float32 sums round differently (~1e-7 relative per step).
    AdamW divides by sqrt(v): on a weight whose gradient is near zero that rounding can move the update
    by up to lr (1e-3) per step, on 3 steps; we allow 1e-4 absolute (measured: 1.1e-6 on 1, 1.4e-6 on 4) and
    check the moments were really loaded: resumed with fresh (zero) moments the weights differ by far more."""
    b = tmp_path / "run"
    shutil.copytree(killed, b)
    cmd = sft_args(toy, b, per_device, "--resume")
    ok(torchrun(ranks, cmd, timeout=300) if ranks > 1 else run([sys.executable, *cmd], timeout=300))
    wa, wb = weights(uninterrupted), weights(b)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"max |resumed on {ranks} - uninterrupted on 2| = {diff:.2e}")
    assert diff < 1e-4, diff
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]   # each step once


def test_resume_with_fresh_moments_would_not_pass(toy, uninterrupted, killed, tmp_path):
    """The control for the tolerance above: the same resume with the saved AdamW moments zeroed ends
    far from the uninterrupted run, so the 1e-4 check can fail."""
    b = tmp_path / "run"
    shutil.copytree(killed, b)
    for shard in (b / "train_state" / "optimizer").glob("*.safetensors"):
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(shard), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: (v if k.endswith(".step") else torch.zeros_like(v)) for k, v in tensors.items()}, str(shard), meta)
    ok(run([sys.executable, *sft_args(toy, b, 8, "--resume")], timeout=300))
    wa, wb = weights(uninterrupted), weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) > 1e-3


def test_bad_resume_inputs_are_one_line_and_write_nothing(toy, killed, tmp_path):
    b = tmp_path / "run"
    shutil.copytree(killed, b)
    before = digest(b)
    # a changed global batch (1 process, per device 4: 8 instead of 16), with what to pass: the whole
    # script, for its exit code and its one line
    p = run([sys.executable, *sft_args(toy, b, 4, "--resume")], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip() == ("error: --resume: the global batch (--per_device_train_batch_size x ranks x "
                                "--gradient_accumulation_steps) was 16 (4 x 2 x 2), now 8; pass "
                                "--per_device_train_batch_size 8 to keep it")
    assert digest(b) == before                                      # nothing written, nothing removed
    # the folder of another stage (the check reward.py and cost.py make before reading anything)
    from types import SimpleNamespace
    with pytest.raises(UserError, match="was written by sft.py, not reward.py"):
        plumbing.open_run_folder(SimpleNamespace(output_dir=str(b), resume=True, overwrite=False), 2, True, "reward")
    # a half-written train state: its file missing, or cut short (a copy interrupted by hand)
    import model as M
    policy = M.load_causal_lm(str(b), M.load_tokenizer(toy / "tokenizer", "right"))
    optimizer = plumbing.make_optimizer(policy, lr=1e-3, weight_decay=0.0)
    state = plumbing.load_train_state(b)
    moments = b / "train_state" / "optimizer" / "model.safetensors"
    moments.rename(tmp_path / "away")
    with pytest.raises(UserError, match=f"--resume: the train state in {moments.parent} is missing"):
        plumbing.load_optimizer_state(policy, optimizer, "optimizer", state)
    data = (tmp_path / "away").read_bytes()
    moments.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="--resume: cannot read the train state in .*model.safetensors is damaged"):
        plumbing.load_optimizer_state(policy, optimizer, "optimizer", state)
    moments.write_bytes(data)                                       # and whole again, it loads
    plumbing.load_optimizer_state(policy, optimizer, "optimizer", state)
    assert float(optimizer.state[next(iter(policy.parameters()))]["exp_avg"].abs().sum()) > 0


def test_global_batch_check_names_what_to_pass():
    from types import SimpleNamespace as Args
    saved = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "per_device_prompt_batch_size": 10}
    now = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, per_device_prompt_batch_size=5)
    plumbing.check_global_batches(Args(**now), saved, saved_ranks=2, world_size=4)   # 4 x 2 x 3 = 2 x 4 x 3; 10 x 2 = 5 x 4
    with pytest.raises(UserError, match=r"was 24 \(4 x 2 x 3\), now 48; pass --per_device_train_batch_size 2 to keep it"):
        plumbing.check_global_batches(Args(**dict(now, per_device_train_batch_size=4)), saved, saved_ranks=2, world_size=4)
    with pytest.raises(UserError, match=r"was 24 \(4 x 2 x 3\), now 18; it cannot be split evenly over 3 rank\(s\)"):
        plumbing.check_global_batches(Args(**now), saved, saved_ranks=2, world_size=3)
    with pytest.raises(UserError, match=r"--per_device_prompt_batch_size x ranks\) was 20 \(10 x 2\), now 40; pass "
                                        r"--per_device_prompt_batch_size 5"):
        plumbing.check_global_batches(Args(**dict(now, per_device_prompt_batch_size=10)), saved, saved_ranks=2, world_size=4)


def test_episode_cost_windows_are_dealt_out_on_another_number_of_ranks():
    import model as M
    import policy_run
    saved = [[1.0, 2.0, 3.0], [4.0, 5.0]]                            # two ranks' windows
    same = [policy_run.episode_cost_window(saved, M.Dist(r, r, 2, torch.device("cpu"))) for r in range(2)]
    assert same == saved                                             # the same ranks: each its own
    four = [policy_run.episode_cost_window(saved, M.Dist(r, r, 4, torch.device("cpu"))) for r in range(4)]
    assert four == [[1.0, 5.0], [2.0], [3.0], [4.0]]                 # pooled, dealt out in turn
    one = policy_run.episode_cost_window(saved, M.Dist(0, 0, 1, torch.device("cpu")))
    assert one == [1.0, 2.0, 3.0, 4.0, 5.0]
