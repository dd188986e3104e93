"""Shared fixtures: a tiny word-level tokenizer and tiny LLaMA policies, built in code (no network)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = ("BEGINNING OF CONVERSATION : USER ASSISTANT how do i bake bread fix a bike knead the dough "
         "sorry cannot help with that call professional first then finally").split()


def make_word_tokenizer(folder: Path, with_pad: bool = True):
    """A LLaMA-like word-level tokenizer: BOS prepended, EOS '</s>' a single token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad else [])
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if with_pad else None)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer_dir_nopad(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("tok_nopad"), with_pad=False)


def run(cmd, timeout=300, env=None, cwd=ROOT):
    """Run a command, fail the test with its output if it fails or times out."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return p


def free_port() -> int:
    """A port nothing listens on now (tests run in parallel: `make test` is pytest -n 2)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script_args, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *map(str, script_args)]
    return run(cmd, timeout=timeout, env=dict({"OMP_NUM_THREADS": "1"}, **(env or {})))


def make_toy_checkpoints(root: Path) -> Path:
    """Toy data under root/toy plus random-init tiny SFT / reward / cost checkpoints (the stages'
    output format) under root/sft, root/reward, root/cost. Returns the toy data folder."""
    import torch

    import model as M
    import toyworld

    data = toyworld.ensure_toy_data(root / "toy")
    tok = M.load_tokenizer(data / "tokenizer", "right")
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    M.save_checkpoint(root / "sft", d, tok, {"": M.load_causal_lm("toy-tiny", tok)})
    for kind in ("reward", "cost"):
        M.save_checkpoint(root / kind, d, tok, {"": M.load_score_model(str(root / "sft"), tok, kind)})
    return data


def pytest_collection_modifyitems(items):
    """The longest test (the whole pipeline, about 3 min) first: under `pytest -n 2` one worker runs it
    while the other works through the rest, instead of starting it last."""
    items.sort(key=lambda item: item.name != "test_demo_pipeline_smoke")
