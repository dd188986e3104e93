"""Two nodes, simulated: two torchrun launchers on this machine (`--nnodes 2 --nproc_per_node 1`,
c10d rendezvous on localhost) train to the same weights as one launcher with two processes
(`--nproc_per_node 2`). Global rank 0 alone reads the checkpoints and
swaps the saved folder into place, whichever node it lands on; every rank writes its shards."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port, make_toy_checkpoints, torchrun

SFT = ["sft.py", "--model_name_or_path", "toy-tiny", "--limit", "64", "--epochs", "1", "--per_device_train_batch_size", "8",
       "--gradient_accumulation_steps", "2", "--lr", "1e-3", "--toy_eval_samples", "0", "--eval_limit", "16"]
PPO = ["ppo_lagrangian.py", "--epochs", "1", "--limit", "16", "--per_device_prompt_batch_size", "8",
       "--per_device_train_batch_size", "8", "--max_length", "40", "--sample_every", "0", "--device", "cpu", "--threshold", "-1"]


def two_nodes(script_args, timeout=300, tries=2):
    """Two launchers, one process each, meeting through a c10d rendezvous on localhost. A second try
    on a fresh port if the first times out: once in a full-suite run on a loaded machine the two
    launchers never met (not reproduced in 5 runs alone); a real hang times out both tries."""
    for attempt in range(tries):
        try:
            return _two_nodes([*script_args, "--overwrite"], timeout)   # a retry replaces what the first left
        except subprocess.TimeoutExpired:
            if attempt == tries - 1:
                raise


def _two_nodes(script_args, timeout):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test{port}",
           *map(str, script_args)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]


def same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    make_toy_checkpoints(root)
    return root


def test_sft_on_two_nodes_matches_two_ranks_on_one(ckpt, tmp_path):
    common = [*SFT, "--dataset", ckpt / "toy" / "sft", "--tokenizer_name_or_path", ckpt / "toy" / "tokenizer"]
    p = torchrun(2, [*common, "--output_dir", tmp_path / "one_node"])
    assert p.returncode == 0, p.stderr[-3000:]
    two_nodes([*common, "--output_dir", tmp_path / "two_nodes"])
    same_weights(tmp_path / "one_node", tmp_path / "two_nodes")


def test_ppo_lagrangian_on_two_nodes_matches_two_ranks_on_one(ckpt, tmp_path):
    common = [*PPO, "--actor_model_name_or_path", ckpt / "sft", "--reward_model_name_or_path", ckpt / "reward",
              "--cost_model_name_or_path", ckpt / "cost", "--dataset", ckpt / "toy" / "prompts"]
    p = torchrun(2, [*common, "--output_dir", tmp_path / "one_node"])
    assert p.returncode == 0, p.stderr[-3000:]
    two_nodes([*common, "--output_dir", tmp_path / "two_nodes"])
    same_weights(tmp_path / "one_node", tmp_path / "two_nodes")
    same_weights(tmp_path / "one_node" / "cost_critic", tmp_path / "two_nodes" / "cost_critic")
