"""model.py: the one file every stage stands on.

What lives here (and nothing else: no loss, no training loop):
  1. Errors        UserError and `run_main`, so bad input ends in one clear line, not a traceback.
  2. Tokenizer     loading with an explicit padding side, PAD distinct from EOS, a start-up check.
  3. Policy        any Hugging Face decoder-only causal LM (local folder or hub name), or a tiny
                   LLaMA built from a named preset (random init) for the toy world and the tests.
  4. ScoreModel    bare decoder (`AutoModel`) + linear `score_head` with bias: per-token scores
                   (B, L) and the end score (B,) at the last attended token. Used for the reward
                   model, the cost model and both critics (REFERENCE.md section 1).
  5. Distributed   written by hand: torchrun's environment -> process group (nccl on CUDA, gloo on
                   CPU, none for a plain `python x.py`), seeds, FSDP2 `fully_shard` per decoder
                   layer then the root, full-state-dict gathering, atomic checkpoint folders.
  6. Math helpers  shared by several stages: masked means, whitening, log-prob gathering with the
                   one-token shift, and sampling from exactly softmax(logits / temperature).

Checkpoint format (a Hugging Face-style folder, safetensors only, never pickle):
  config.json        the backbone's config; a score model adds "architectures": ["<Family>ForScore"],
                     "score_type" (reward | cost | critic), "score_dim": 1, "score_bias": true
  model.safetensors  weights (sharded with an index for large models); a score model's keys are the
                     causal LM's "model.*" keys plus "score_head.weight" / "score_head.bias"
  tokenizer files    from `tokenizer.save_pretrained`
  train_state.*      only in resumable checkpoints: optimiser/scheduler/RNG/data position
                     (train_state.safetensors for tensors, train_state.json for the rest)
A saved policy loads with plain `transformers.AutoModelForCausalLM.from_pretrained(path)`.

Shape letters used below: B batch, L sequence length (prompt + response), S prompt length,
T generated length, V vocabulary size, E hidden size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# --------------------------------------------------------------------------------------------
# 1. Errors: one line for the user, no traceback
# --------------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input (a missing file, field or checkpoint; an empty data set; NaN losses). The message
    names the file, row or argument; `run_main` prints it as one line and exits with status 2."""


def run_main(main, *args) -> None:
    """Call main(*args); turn a UserError into `error: <message>` on stderr and exit code 2."""
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (some libraries raise with an empty one)."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    """Stop with one line when a loss is NaN/inf (nothing after the last good checkpoint is saved)."""
    if not torch.isfinite(value).all():
        raise UserError(f"{what} is not finite at step {step}; stopping before anything is saved "
                        "(try a lower learning rate)")


# --------------------------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------------------------

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"  # REFERENCE.md 6.1
DEFAULT_PAD_TOKEN = "<pad>"  # the official code adds "<pad>" when a tokenizer has none (REF 1.2)


def quiet_hf() -> None:
    """Silence transformers' load reports and progress bars (expected 'unexpected keys' such as
    lm_head.weight when a score model starts from a policy would otherwise flood every log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def format_prompt(request: str) -> str:
    """The official single-turn template; the response is appended directly after 'ASSISTANT:'."""
    return PROMPT_TEMPLATE.format(input=request)


def load_tokenizer(name_or_path: str | os.PathLike, padding_side: str,
                   trust_remote_code: bool = False, stage_hint: str = ""):
    """Load a tokenizer and make it safe for this project.

    padding_side: 'right' for training (SFT, reward, cost), 'left' for generation (the prompt's
    last token must sit in the last column so new tokens append to every row at once).
    """
    from transformers import AutoTokenizer

    quiet_hf()
    assert padding_side in ("left", "right"), padding_side
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = f" ({stage_hint})" if stage_hint else ""
        raise UserError(f"cannot load a tokenizer from {name_or_path!s}{hint}: {_first_line(e)}") from None
    # PAD must differ from EOS: if they were equal, the attention mask would hide every EOS and the
    # end score would be read one token early (REFERENCE.md 10.5).
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    tokenizer.padding_side = padding_side
    check_tokenizer(tokenizer, name_or_path)
    return tokenizer


def check_tokenizer(tokenizer, where) -> None:
    """Start-up self-check: EOS exists and is a single token; PAD exists and is not EOS."""
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer at {where} has no EOS token")
    eos_ids = tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if eos_ids != [tokenizer.eos_token_id]:
        raise UserError(f"tokenizer at {where}: EOS string {tokenizer.eos_token!r} encodes to {eos_ids}, "
                        "not to the single EOS id")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"tokenizer at {where}: PAD must be a token distinct from EOS")


def resize_embeddings(model: nn.Module, tokenizer) -> None:
    """Grow the embedding (and LM head) to the tokenizer; new rows are the mean of the old ones,
    as the official code does (REFERENCE.md 1.2). Never shrinks (padded vocabularies stay)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    # Keep the config's special ids in sync with the tokenizer (REFERENCE.md 1.2).
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))


# --------------------------------------------------------------------------------------------
# 3. Policy: a causal LM from a checkpoint, or a tiny LLaMA from a preset
# --------------------------------------------------------------------------------------------

# Presets are random-init LLaMA configs. "toy-*" are sized for a CPU; the others exist for the
# memory estimate and the GPU benchmark (never downloaded: only the shapes are used).
PRESETS: dict[str, dict] = {
    "toy-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172),
    "toy-small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, max_position_embeddings=2048, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                     max_position_embeddings=2048, vocab_size=32000),
}


def preset_config(preset: str, vocab_size: int | None = None, **overrides):
    """A LlamaConfig from a named preset; vocab_size comes from the tokenizer for the toy presets."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)} "
                        "or give a checkpoint folder / hub name")
    kwargs = dict(max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    kwargs.update(PRESETS[preset])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def is_score_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "score_type" in json.loads(cfg.read_text())


def _check_checkpoint_path(name_or_path: str, stage_hint: str = "") -> None:
    """A local-looking path must be a checkpoint folder; a hub name ('org/name') is left to HF."""
    p = Path(name_or_path)
    looks_local = p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if not looks_local:
        return
    hint = f" ({stage_hint})" if stage_hint else ""
    if not p.exists():
        raise UserError(f"checkpoint {name_or_path} does not exist{hint}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"{name_or_path} is not a checkpoint folder: no config.json{hint}")
    if not any(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").is_file():
        raise UserError(f"{name_or_path} is not a checkpoint folder: no *.safetensors weights{hint}")


def load_causal_lm(name_or_path: str, tokenizer, *, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False, stage_hint: str = "", device: str | torch.device = "cpu",
                   meta: bool = False):
    """A policy: a named preset (random init; same weights on every rank because every rank uses
    the same seed before this call) or any HF decoder-only causal LM checkpoint.

    meta=True builds only the skeleton on the meta device (no memory, no disk reads): under
    torchrun every rank but 0 does this, and prepare_model broadcasts rank 0's weights into the
    shards, so an 8-GPU node holds one CPU copy of each checkpoint instead of eight."""
    from transformers import AutoModelForCausalLM

    if meta:
        return _skeleton(AutoModelForCausalLM, name_or_path, tokenizer, dtype, trust_remote_code, stage_hint)
    if name_or_path in PRESETS:
        model = AutoModelForCausalLM.from_config(preset_config(name_or_path, vocab_size=len(tokenizer)))
        model.to(dtype)
    else:
        _check_checkpoint_path(name_or_path, stage_hint)
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype, trust_remote_code, device, stage_hint)
    resize_embeddings(model, tokenizer)
    return model


def _skeleton(auto_cls, name_or_path, tokenizer, dtype, trust_remote_code, stage_hint, score_type=None):
    """The model's modules with meta tensors: shapes only, from the preset or the checkpoint config."""
    from transformers import AutoConfig

    if name_or_path in PRESETS:
        config = preset_config(name_or_path, vocab_size=len(tokenizer))
    else:
        _check_checkpoint_path(name_or_path, stage_hint)
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        config.architectures = None
    config.vocab_size = max(config.vocab_size, len(tokenizer))  # as resize_embeddings on rank 0
    with torch.device("meta"):
        model = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
        if score_type is not None:
            model = ScoreModel(model, score_type)
    model.to(dtype)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    return model


def _from_pretrained(auto_cls, name_or_path, dtype, trust_remote_code, device="cpu", stage_hint=""):
    """HF loading; a failure (e.g. 'runs/sft' missing locally and not on the hub) is one line."""
    try:
        return auto_cls.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                        use_safetensors=True, device_map=str(device) if device != "cpu" else None)
    except (OSError, ValueError) as e:
        hint = f" ({stage_hint})" if stage_hint else ""
        raise UserError(f"cannot load model from {name_or_path}: not a local checkpoint folder, and the hub "
                        f"says: {_first_line(e)}{hint}") from None


# --------------------------------------------------------------------------------------------
# 4. ScoreModel: reward model, cost model, reward critic, cost critic
# --------------------------------------------------------------------------------------------

SCORE_TYPES = ("reward", "cost", "critic")


@dataclass
class ScoreOutput:
    scores: torch.Tensor      # (B, L) fp32: the head at every position (critics use these as V_t)
    end_scores: torch.Tensor  # (B,)  fp32: the head at the last attended token (EOS in practice)
    end_index: torch.Tensor   # (B,)  long: that token's position


class ScoreModel(nn.Module):
    """Backbone (the family's bare decoder, no LM head) + `score_head: R^E -> R^1` with bias.

    The backbone attribute is called `model`, as in LlamaForCausalLM, so a score model's weights
    have the causal LM's names plus `score_head.*`: initialising from a policy checkpoint is a
    plain load, and the trained head travels with the score model's own checkpoints.
    """

    def __init__(self, backbone: nn.Module, score_type: str):
        super().__init__()
        assert score_type in SCORE_TYPES, score_type
        self.model = backbone
        self.config = backbone.config
        self.score_type = score_type
        self.score_head = nn.Linear(self.config.hidden_size, 1, bias=True)
        # Head initialisation (REFERENCE.md 1.2): weight ~ N(0, initializer_range) as HF's
        # _init_weights would do for a missing head; bias explicitly zero.
        nn.init.normal_(self.score_head.weight, std=getattr(self.config, "initializer_range", 0.02))
        nn.init.zeros_(self.score_head.bias)
        self.score_head.to(next(backbone.parameters()).dtype)
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, right_padded: bool = False,
                position_ids: torch.Tensor | None = None) -> ScoreOutput | torch.Tensor:
        """attention_mask (B, L) 0/1: a ScoreOutput (right_padded=True: see backbone_masking).
        attention_mask (B, 1, L, L) bool, with position_ids (B, L): rows that pack several sequences
        (reward.pack_pairs); returns the per-token scores (B, L) only, the caller knows the ends."""
        packed = attention_mask.dim() == 4
        masking = {"attention_mask": attention_mask, "position_ids": position_ids} if packed \
            else backbone_masking(attention_mask, right_padded)
        hidden = self.model(input_ids=input_ids, **masking, use_cache=False).last_hidden_state  # (B, L, E)
        scores = self.score_head(hidden).squeeze(-1).float()              # (B, L) in fp32
        if packed:
            return scores
        end_index = last_attended_index(attention_mask)                   # (B,)
        end_scores = scores.gather(1, end_index[:, None]).squeeze(1)      # (B,)
        return ScoreOutput(scores=scores, end_scores=end_scores, end_index=end_index)

    # Pass-throughs that generic code (FSDP wrapping, checkpointing, resizing) calls on HF models.
    def activation_checkpointing_enable(self, **kwargs):
        self.model.activation_checkpointing_enable(**kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def resize_token_embeddings(self, *args, **kwargs):
        return self.model.resize_token_embeddings(*args, **kwargs)

    def score_config(self) -> dict:
        """The backbone config plus what says 'this is a score model' (REFERENCE.md 1.5)."""
        cfg = self.config.to_dict()
        family = type(self.model).__name__.removesuffix("Model")
        cfg.update(architectures=[f"{family}ForScore"], score_type=self.score_type, score_dim=1, score_bias=True)
        return cfg


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B,) index of the last 1 in each row, whatever side is padded
    (REFERENCE.md 1.3). Plain loop it replaces: max(t for t in range(L) if mask[b, t])."""
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)  # (B, L)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values          # (B,)


def backbone_masking(attention_mask: torch.Tensor, right_padded: bool) -> dict:
    """The attention mask and position ids to hand an HF backbone.

    Default: the mask, and positions counted over real tokens (position_ids_from_mask), which any
    padding needs. In a right-padded batch (collate_right, reward.collate_pairs) every pad comes after
    the real tokens of its row, so causal attention alone keeps real tokens from seeing pads and the
    positions 0..L-1 are already right: pass neither, and SDPA runs its causal kernel instead of
    building a (B, 1, L, L) mask (5-10% faster on CPU; real tokens' outputs are identical,
    tests/test_model.py). Position ids must go too: without a mask, transformers reads a position
    that does not grow by 1 as the start of a packed sequence and builds a mask after all."""
    if right_padded:
        return {"attention_mask": None, "position_ids": None}
    return {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row starts at 0 like a right-
    padded one (what HF `generate` does; the official forward passes skip this, REF 10.4)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                          # (B, L)


def load_score_model(name_or_path: str, tokenizer, score_type: str, *, dtype: torch.dtype = torch.float32,
                     trust_remote_code: bool = False, stage_hint: str = "", meta: bool = False) -> ScoreModel:
    """From a saved score model (trained head restored) or from a causal-LM checkpoint / preset
    (fresh head). `score_type` overrides the saved one (a critic loaded from a reward model).
    meta=True: the skeleton only, as in load_causal_lm."""
    from transformers import AutoConfig, AutoModel

    if meta:
        return _skeleton(AutoModel, name_or_path, tokenizer, dtype, trust_remote_code, stage_hint, score_type)
    if name_or_path in PRESETS:
        backbone = AutoModel.from_config(preset_config(name_or_path, vocab_size=len(tokenizer))).to(dtype)
        model = ScoreModel(backbone, score_type)
    else:
        _check_checkpoint_path(name_or_path, stage_hint)
        if is_score_checkpoint(name_or_path):
            # The saved config is the backbone's plus score fields; AutoModel ignores the extras and
            # loads the "model.*" weights (HF strips the base-model prefix), the head is read below.
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            config.architectures = None
            backbone = _from_pretrained_with_config(AutoModel, name_or_path, config, dtype, trust_remote_code)
            model = ScoreModel(backbone, score_type)
            head = _read_tensors(Path(name_or_path), ("score_head.weight", "score_head.bias"))
            model.score_head.load_state_dict({k.removeprefix("score_head."): v.to(dtype) for k, v in head.items()})
        else:
            backbone = _from_pretrained(AutoModel, name_or_path, dtype, trust_remote_code, stage_hint=stage_hint)
            model = ScoreModel(backbone, score_type)
    resize_embeddings(model, tokenizer)
    return model


def _from_pretrained_with_config(auto_cls, path, config, dtype, trust_remote_code):
    try:
        return auto_cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
                                        use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model from {path}: {_first_line(e)}") from None


def _read_tensors(folder: Path, names) -> dict[str, torch.Tensor]:
    """Read named tensors from a (possibly sharded) safetensors checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {n: folder / weight_map[n] for n in names if n in weight_map}
    else:
        files = {n: folder / "model.safetensors" for n in names}
    out = {}
    for name, file in files.items():
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                out[name] = f.get_tensor(name)
    missing = [n for n in names if n not in out]
    if missing:
        raise UserError(f"{folder} is a score-model folder without {', '.join(missing)}")
    return out


# --------------------------------------------------------------------------------------------
# 5. Distributed set-up, written by hand (torchrun -> process group -> FSDP2 -> checkpoints)
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_initialized()


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; init nccl on CUDA, gloo on CPU.

    A plain `python x.py` (no RANK in the environment) gets no process group at all: one process,
    no FSDP, the same code path otherwise. device: 'auto' (CUDA if present), 'cpu' or 'cuda'.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world_size, dev)


def teardown_distributed() -> None:
    """Wait for every rank, then destroy the process group. Without the barrier a rank that
    finishes first can tear down while rank 0 is still writing, and gloo aborts the others."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python and torch. Call it with the SAME seed on every rank before building models
    (identical initial weights), then with a per-rank seed (seed + rank) before data shuffling and
    sampling, so ranks see different data and draw different samples (CleanRL's multi-GPU note)."""
    random.seed(seed)
    torch.manual_seed(seed)


def print0(*args, **kwargs) -> None:
    """The one printing helper: rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity without a process group)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class HF lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = model.model if isinstance(model, ScoreModel) else model
    names |= set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"cannot find decoder layers to shard in {type(model).__name__}")
    return layers


def prepare_model(model: nn.Module, dist_: Dist, *, trainable: bool, bf16: bool,
                  activation_checkpointing: bool = False) -> nn.Module:
    """Move to the device and, under torchrun, shard with FSDP2.

    Trainable models keep fp32 master weights; with bf16 (GPU) FSDP2 computes in bf16 and reduces
    gradients in fp32. Frozen models are cast to bf16 on GPU outright (no optimiser needs fp32).
    Dropout is switched off everywhere (RLHF log-prob ratios must be deterministic).
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if activation_checkpointing and trainable:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
        if bf16:
            model.to(torch.bfloat16)
    if not dist_.enabled:
        model.to(dist_.device)
        return model if trainable else model.eval()

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Mixed precision policy: parameters all-gathered in bf16 for compute, gradients reduced in
    # fp32 (GPU, trainable); fp32 throughout on CPU. Frozen bf16 models need no policy.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if (bf16 and trainable) else MixedPrecisionPolicy()
    # Rank 0 holds the real weights (other ranks may hold a meta skeleton, see load_causal_lm).
    # Shard the skeleton, allocate the shards, then scatter rank 0's full tensors into them.
    full = {k: v for k, v in model.state_dict().items()} if dist_.is_main else {}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if dist_.is_main else {}
    model.to("meta")
    for layer in decoder_layers(model):  # each decoder block first, then the root
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=dist_.device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    with torch.no_grad():  # buffers (e.g. RoPE's inv_freq, not in the state dict) are replicated
        for name, buf in model.named_buffers():
            if dist_.is_main:
                buf.copy_(buffers[name].to(buf.device))
            dist.broadcast(buf, src=0)
    # Check once after wrapping (pytorch/examples FSDP2): every parameter is a sharded DTensor.
    from torch.distributed.tensor import DTensor
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), f"{name} was not sharded"
    return model if trainable else model.eval()


@contextlib.contextmanager
def gathered_weights(model: nn.Module):
    """Gather an FSDP2 model's weights once for a whole generation instead of once per decoding
    step: with reshard_after_forward off, the first forward all-gathers and later ones reuse the
    full weights; on exit everything is resharded. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) state dict, on CPU. Collective: call on every rank; under FSDP
    only rank 0 receives the tensors (others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # clone: gathered tensors can be views into one flat buffer, which safetensors refuses
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Inverse of full_state_dict for a (possibly sharded) model; every rank passes the full dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


# ---- atomic checkpoint folders -------------------------------------------------------------


def recover_checkpoint(folder: str | os.PathLike) -> None:
    """Undo a save that was killed between its two renames (see atomic_folder), and drop stale
    temporary folders. Safe to call on every start."""
    folder = Path(folder)
    old, parent = folder.with_name(folder.name + ".old"), folder.parent
    if not folder.exists() and old.exists():
        old.rename(folder)
    elif old.exists():
        shutil.rmtree(old)
    if parent.exists():
        for tmp in parent.glob(folder.name + ".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, keep: tuple[str, ...] = ("metrics.jsonl", "args.json", "samples.jsonl")):
    """Write a checkpoint into `<folder>.tmp-<pid>`, then swap it into place.

    A crash while writing leaves the previous `folder` untouched (the temporary folder is removed
    on the next start). The swap is two renames (folder -> folder.old, tmp -> folder); a crash
    between them is undone by `recover_checkpoint`. Run files named in `keep` (logs written next
    to the checkpoint) are carried over from the old folder.
    """
    folder = Path(folder)
    recover_checkpoint(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in keep:
        if (folder / name).is_file() and not (tmp / name).exists():
            shutil.copy2(folder / name, tmp / name)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def write_model_files(folder: Path, model: nn.Module, state_dict: dict[str, torch.Tensor], tokenizer) -> None:
    """Rank 0: config.json + safetensors weights (+ index when sharded) + tokenizer files."""
    from huggingface_hub import save_torch_state_dict

    if isinstance(model, ScoreModel):
        (folder / "config.json").write_text(json.dumps(model.score_config(), indent=2, sort_keys=True) + "\n")
    else:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    # Tied weights (e.g. lm_head = embed_tokens) are stored once, as HF does.
    save_torch_state_dict(state_dict, folder, max_shard_size="5GB", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def save_checkpoint(folder: str | os.PathLike, dist_: Dist, tokenizer, models: dict[str, nn.Module],
                    train_state: dict | None = None) -> None:
    """Save one or more models (and optionally a resumable train state) atomically.

    models: {"": main model, "reward_critic": ..., ...}; "" goes in the folder itself, others in
    sub-folders. Collective: every rank must call it (the state dicts are gathered), rank 0 writes.
    train_state: {"tensors": {name: Tensor}, "json": {...}} or None.
    """
    state_dicts = {name: full_state_dict(m) for name, m in models.items()}
    if dist_.is_main:
        with atomic_folder(folder) as tmp:
            for name, m in models.items():
                sub = tmp / name if name else tmp
                sub.mkdir(parents=True, exist_ok=True)
                write_model_files(sub, m, state_dicts[name], tokenizer)
            if train_state is not None:
                save_file(train_state["tensors"], str(tmp / "train_state.safetensors"))
                (tmp / "train_state.json").write_text(json.dumps(train_state["json"], indent=1) + "\n")
    barrier()


def load_train_state(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    if not (folder / "train_state.json").is_file():
        raise UserError(f"--resume: {folder} holds no resumable state (train_state.json); "
                        "it was not written by an interrupted run of this stage")
    return {"tensors": load_file(str(folder / "train_state.safetensors")),
            "json": json.loads((folder / "train_state.json").read_text())}


# ---- optimiser, scheduler and RNG state as safetensors + JSON (no pickle) --------------------


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str) -> dict:
    """Full (unsharded) optimiser state keyed by parameter name: tensors + JSON-able rest."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {}  # under FSDP only rank 0 receives the full state; the other ranks get {}
    for pname, st in osd.get("state", {}).items():
        for k, v in st.items():
            tensors[f"{prefix}.state.{pname}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
    return {"tensors": tensors, "json": {f"{prefix}.param_groups": osd.get("param_groups", [])}}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    tag = f"{prefix}.state."
    per_param: dict[str, dict] = {}
    for key, value in state["tensors"].items():
        if key.startswith(tag):
            pname, k = key[len(tag):].rsplit(".", 1)
            per_param.setdefault(pname, {})[k] = value
    osd = {"state": per_param, "param_groups": state["json"][f"{prefix}.param_groups"]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return {"tensors": tensors, "json": {"rng.python": [version, list(internal), gauss]}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["tensors"]["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in state["tensors"]:
        torch.cuda.set_rng_state(state["tensors"]["rng.cuda"])
    version, internal, gauss = state["json"]["rng.python"]
    random.setstate((version, tuple(internal), gauss))


def merge_states(*parts: dict) -> dict:
    out = {"tensors": {}, "json": {}}
    for p in parts:
        out["tensors"].update(p["tensors"])
        out["json"].update(p["json"])
    return out


def gather_rng_states(dist_: Dist) -> dict:
    """Every rank's RNG state, collected on rank 0 (per-rank seeds mean per-rank states)."""
    mine = rng_state()
    if not dist_.enabled:
        return {"tensors": {f"rank0.{k}": v for k, v in mine["tensors"].items()},
                "json": {f"rank0.{k}": v for k, v in mine["json"].items()}}
    gathered = [None] * dist_.world_size
    dist.all_gather_object(gathered, {"t": {k: v.tolist() for k, v in mine["tensors"].items()}, "j": mine["json"]})
    out = {"tensors": {}, "json": {}}
    for r, g in enumerate(gathered):
        out["tensors"].update({f"rank{r}.{k}": torch.tensor(v, dtype=torch.uint8) for k, v in g["t"].items()})
        out["json"].update({f"rank{r}.{k}": v for k, v in g["j"].items()})
    return out


def restore_rng_states(state: dict, dist_: Dist) -> None:
    tag = f"rank{dist_.rank}."
    if f"{tag}rng.torch" not in state["tensors"]:
        raise UserError(f"--resume: the checkpoint was written by a run with fewer ranks (no RNG state for rank {dist_.rank})")
    set_rng_state({"tensors": {k[len(tag):]: v for k, v in state["tensors"].items() if k.startswith(tag)},
                   "json": {k[len(tag):]: v for k, v in state["json"].items() if k.startswith(tag)}})


# ---- optimiser and schedule shared by every stage (REFERENCE.md 5.10) ------------------------


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95) as the official code; no weight decay on biases and norm weights
    (deviation: the official name test misses LLaMA's final `model.norm.weight`, REF 10.8; we
    exclude every 1-D parameter)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one CUDA kernel for the whole update (the official FusedAdam); on a CPU the default
    fused = decay[0].device.type == "cuda" if decay else False
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """'cosine': linear warmup then cosine decay to 0 (HF get_cosine_schedule_with_warmup);
    'constant': constant (the official critic schedule ignores warmup, REF 10.8)."""
    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    schedules = {"cosine": cosine, "constant": lambda step: 1.0}
    if kind not in schedules:
        raise UserError(f"unknown lr schedule {kind!r}; choose cosine or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules[kind])


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global-norm clipping; works on FSDP2 DTensor gradients (the norm is reduced over ranks)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


# ---- arguments, data and logging plumbing every stage uses ---------------------------------


def parse_args(cls, argv=None, description: str | None = None):
    """Parse argv into the stage's Args dataclass. Each field's help is the one-line docstring
    written under it (CleanRL style); bools get --flag / --no-flag; `--help` lists them all."""
    import argparse
    import ast
    import dataclasses
    import inspect
    import types
    import typing

    helps = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            helps[node.target.id] = nxt.value.value
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=helps.get(f.name, ""))
            continue
        base = kind
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            base = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(base) is list:
            inner = typing.get_args(base)[0]
            parser.add_argument(f"--{f.name}", type=inner, nargs="+", default=default, help=helps.get(f.name, ""))
        else:
            parser.add_argument(f"--{f.name}", type=base, default=default, help=helps.get(f.name, ""))
    return cls(**vars(parser.parse_args(list(map(_underscored, sys.argv[1:] if argv is None else argv)))))


def _underscored(token: str) -> str:
    """Flag names take dashes or underscores alike: --estimate-memory is --estimate_memory,
    --no-group-by-length is --no-group_by_length. Values are left alone."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    negated = name.startswith("--no-")
    name = name[5:] if negated else name[2:]
    return ("--no-" if negated else "--") + name.replace("-", "_") + eq + value


def load_rows(dataset: str, split: str, *, revision: str | None = None, limit: int | None = None,
              required: tuple[str, ...] = (), what: str = "--dataset") -> list[dict]:
    """Rows of a data set through `datasets.load_dataset`, hub or local: the same code path.

    dataset: a hub name (e.g. PKU-Alignment/PKU-SafeRLHF), a local .json/.jsonl file, or a local
    folder holding `<split>.jsonl` (or `<split>.json`). Rows missing a required field, an empty
    set, or an unreadable file give one UserError naming the file, field and row.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one line says what failed
    path = Path(dataset)
    local = [path] if path.is_file() else sorted(path.glob(f"{split}.json*")) if path.is_dir() else []
    if local and all(f.stat().st_size < 1 << 20 and not f.read_text(errors="replace").strip() for f in local):
        raise UserError(f"{what} {dataset} (split {split}) is empty")  # datasets' own error here is blank
    try:
        if path.is_file():
            ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
        elif path.is_dir():
            files = sorted(path.glob(f"{split}.json*"))
            if not files:
                raise UserError(f"{what} {dataset}: no {split}.jsonl or {split}.json in that folder")
            ds = datasets.load_dataset("json", data_files={split: [str(f) for f in files]}, split=split)
        elif dataset.startswith((".", "/", "~")) or dataset.count("/") != 1:
            raise UserError(f"{what} {dataset}: no such file or folder (and not a hub name 'org/name')")
        else:
            ds = datasets.load_dataset(dataset, split=split, revision=revision)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise UserError(f"{what} {dataset} (split {split}): cannot read it: {_first_line(e)}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.to_list()
    if not rows:
        raise UserError(f"{what} {dataset} (split {split}) is empty")
    for i, row in enumerate(rows):
        for field in required:
            if row.get(field) is None:
                raise UserError(f"{what} {dataset} (split {split}): row {i} has no field {field!r}")
    return rows


IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)


def alpaca_request(row: dict) -> str:
    """Alpaca schema: instruction, plus " " + input when there is one (REFERENCE.md 6.3)."""
    return f"{row['instruction']} {row['input']}" if row.get("input") else row["instruction"]


def tokenize_prompt_response(tokenizer, requests: list[str], responses: list[str], max_length: int):
    """SFT-style examples: BOS + template(request) + response + EOS string, right-truncated to
    max_length (which may cut the EOS); labels are IGNORE_INDEX on the prompt (BOS included), the
    token itself on the response and the EOS (REFERENCE.md 4). Returns ([{input_ids, labels}],
    number truncated)."""
    prompts = [format_prompt(r) for r in requests]
    all_ids = tokenizer([p + r + tokenizer.eos_token for p, r in zip(prompts, responses)],
                        add_special_tokens=True)["input_ids"]
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    examples, truncated = [], 0
    for ids, n_prompt in zip(all_ids, prompt_lengths):
        truncated += len(ids) > max_length
        ids = ids[:max_length]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:]})
    return examples, truncated


def collate_right(examples: list[dict], pad_token_id: int):
    """Right-pad {input_ids, labels} rows to the longest one. -> input_ids, attention_mask, labels (B, L)."""
    L = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), L), dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n], attention_mask[b, :n] = torch.tensor(e["input_ids"]), 1
        labels[b, :n] = torch.tensor(e["labels"])
    return input_ids, attention_mask, labels


def padded_order(n: int, multiple: int) -> tuple[list[int], list[bool]]:
    """0..n-1 padded to a multiple of `multiple` by repeating rows, and which entries are real.
    Every rank then runs the same number of forwards (lockstep); repeats are masked out of the counts."""
    pad = (-n) % multiple
    return list(range(n)) + [i % n for i in range(pad)], [True] * n + [False] * pad


def epoch_order(n: int, seed: int, epoch: int, *, lengths: list[int] | None = None,
                global_batch_size: int = 1, megabatch: int = 64) -> list[int]:
    """The epoch's order of the n training rows: the same on every rank (seeded by seed and epoch),
    so the data position is just the step count and --resume is exact.

    lengths=None: a plain shuffle. With lengths, length-grouped batching (HF Trainer's
    LengthGroupedSampler): shuffle, cut into mega-batches of `megabatch` global batches, sort each
    mega-batch longest first and cut it into global batches, then shuffle the global batches, the
    one holding the longest row first (an out-of-memory shows at step 1, not hours in). Every batch
    then holds rows of similar length, so right padding wastes little compute; each epoch still sees
    every row once, and which rows share a batch stays random within a mega-batch."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    size = megabatch * global_batch_size
    by_length = [i for lo in range(0, n, size)
                 for i in sorted(order[lo:lo + size], key=lambda i: -lengths[i])]          # stable sort
    full = n - n % global_batch_size  # an incomplete last batch stays last (the loop drops it)
    batches = [by_length[lo:lo + global_batch_size] for lo in range(0, full, global_batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch] + by_length[full:]


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: torch's max allocated on a GPU, the peak resident set
    (RSS, which includes Python and the libraries) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def autocast(d: Dist):
    """bf16 compute for a single GPU process (no FSDP mixed-precision policy there); under torchrun
    FSDP2's policy already computes in bf16; on CPU everything stays fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda" and not d.enabled)


def write_json_atomic(path: Path, record: dict) -> None:
    """Write JSON to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def log_line(record: dict) -> str:
    """The plain `|`-separated log line."""
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


def check_same_run(trainer_state: dict, now: dict) -> None:
    """--resume continues the same run: the saved sizes (data rows, global batch, schedule length)
    must equal this invocation's."""
    for key, value in now.items():
        if trainer_state.get(key, value) != value:  # .get: keys added later are absent from older runs
            raise UserError(f"--resume: {key} was {trainer_state[key]} in the interrupted run, now {value}; "
                            "resume with the same data, batch sizes, ranks and epochs")


class JsonlLogger:
    """One structured sink that needs no service: a JSON line per record, rank 0 only. The file
    is opened per write, so it follows the run folder across atomic checkpoint swaps."""

    def __init__(self, path: str | os.PathLike, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def progress(iterable=None, total=None, enabled: bool = True, **kwargs):
    """One tqdm bar on rank 0 (a silent stand-in elsewhere)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, disable=not enabled or not sys.stderr.isatty() and os.environ.get("CI") == "true",
                dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------------------------
# 6. Math helpers shared by several stages
# --------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1 (all positions pooled). (B, T), (B, T) -> ()"""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence token mean, then batch mean: the official `masked_mean` (REF 5.7).
    Plain loop: mean_b( sum_t m[b,t] x[b,t] / sum_t m[b,t] ).   (B, T), (B, T) -> ()"""
    per_sequence = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_sequence.mean()                                                # ()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked positions (unbiased variance), zero outside the mask.
    shift_mean=False rescales only (keeps the sign). (B, T), (B, T) -> (B, T)"""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, in fp32. (B, T, V), (B, T) -> (B, T)"""
    logp = F.log_softmax(logits.float(), dim=-1)                   # (B, T, V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)       # (B, T)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The one-token shift: logits at position t predict token t+1 (REFERENCE.md 0).
    Logits are divided by the sampling temperature before the log-softmax, so these are the
    log-probs of exactly the distribution `sample` draws from.
    (B, L, V), (B, L) -> (B, L-1), entry t = log pi(x_{t+1} | x_{<=t})."""
    return gather_logprobs(logits[:, :-1] / temperature, input_ids[:, 1:])  # (B, L-1)


def policy_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float = 1.0, right_padded: bool = False) -> torch.Tensor:
    """Forward a causal LM and return sequence_logprobs (right_padded: see backbone_masking). (B, L) -> (B, L-1)"""
    logits = model(input_ids=input_ids, **backbone_masking(attention_mask, right_padded), use_cache=False).logits
    return sequence_logprobs(logits, input_ids, temperature)


def all_ranks_done(done: bool, device: torch.device) -> bool:
    """True once every rank is done (one tiny all-reduce). Keeps sharded forwards in lockstep."""
    if not dist.is_initialized():
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0.0


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of left-padded prompts with the KV cache.

    Draws from softmax(logits / temperature) with nothing hidden: no top-k, no top-p (the official
    rollout samples with HF's implicit top_k=50, REFERENCE.md 10.4, and then scores with the full
    softmax; we sample from the distribution we score). temperature == 0 means greedy.
    After a row emits EOS it gets PAD. Under torchrun every rank runs the same number of decoding
    steps (it stops when all rows on all ranks are done), so sharded forwards never hang.

    input_ids, attention_mask: (B, S) left-padded.
    Returns sequences (B, S + T) and their attention mask (B, S + T), T <= max_new_tokens;
    the mask is 1 on real prompt tokens and on generated tokens up to and including EOS.
    """
    from transformers import DynamicCache

    B = input_ids.shape[0]
    if dist.is_initialized():  # every rank must run the same number of steps: agree on the budget
        budget = torch.tensor([max_new_tokens], device=input_ids.device)
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
        max_new_tokens = int(budget.item())
    position_ids = position_ids_from_mask(attention_mask)                            # (B, S)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)            # (B,)
    next_position = position_ids[:, -1] + 1                                          # (B,)
    new_tokens, new_mask = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()                                        # (B, V)
        if temperature == 0:
            token = logits.argmax(dim=-1)                                            # (B,)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)                      # (B, V)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)     # (B,)
        real = ~finished                                                             # (B,)
        token = torch.where(real, token, torch.full_like(token, pad_token_id))      # PAD after EOS
        new_tokens.append(token)
        new_mask.append(real.long())
        finished = finished | (token == eos_token_id)
        if all_ranks_done(bool(finished.all()), input_ids.device):
            break
        attention_mask = torch.cat([attention_mask, real.long()[:, None]], dim=1)    # (B, S + t)
        out = model(input_ids=token[:, None], attention_mask=attention_mask,
                    position_ids=next_position[:, None], past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    mask = torch.cat([attention_mask[:, :input_ids.shape[1]], torch.stack(new_mask, dim=1)], dim=1)
    return sequences, mask


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
