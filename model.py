"""model.py: the model every stage stands on, and nothing else (run plumbing is in plumbing.py).

  1. Tokenizer     the prompt template, loading with an explicit padding side, PAD distinct from EOS,
                   the SFT example (which tokens carry loss), right padding and left-padded prompts.
  2. Policy        any Hugging Face decoder-only causal LM (local folder or hub name), or a tiny
                   LLaMA built from a named preset (random init) for the toy world and the tests;
                   what a model allows (sequences within its position table; its largest weight).
  3. ScoreModel    bare decoder (`AutoModel`) + linear `score_head` with bias: per-token scores
                   (B, L) and the end score (B,) at the last attended token. Used for the reward
                   model, the cost model and both critics (paper section 3.2; safe-rlhf
                   safe_rlhf/models/score_model/__init__.py@82743cc:L45-253); packed pairs' 4D mask
                   in the form each attention backend honours.
  4. Distributed   written by hand: torchrun's environment -> process group (nccl on CUDA, gloo on
                   CPU, none for a plain `python x.py`), seeds, collectives, FSDP2 `fully_shard` per
                   decoder layer then the root (`prepare_model`), weights gathered for generation.
  5. Checkpoints   every rank writes its share of the files at once (whole tensors gathered from the
                   shards to the rank that writes their file; into plumbing.atomic_save, so a crash
                   never leaves half a checkpoint); a diverged model is refused first.
  6. Math          shared by several stages: masked means, log-probs with the one-token shift, and
                   sampling from exactly softmax(logits / temperature) with the rollout mask,
                   with a growing KV cache or a static one (one fixed-shape decoding step to compile).

Checkpoints are Hugging Face folders, safetensors only: config.json (a score model adds
"score_type": reward | cost | critic, "architectures": ["<Family>ForScore"], "score_dim": 1,
"score_bias": true), model.safetensors or, for a larger model, model-0000k-of-0000N.safetensors and
model.safetensors.index.json (a score model: the causal LM's "model.*" keys plus "score_head.*"), the
tokenizer files, and in a resumable one train_state.json, train_state.safetensors (small: RNG
states, lambda) and train_state/<model>/ (the AdamW moments, whole tensors in the same file layout;
plumbing.py). A saved policy loads with plain
`transformers.AutoModelForCausalLM.from_pretrained(path)`.

Shape letters used below: B batch, L sequence length (prompt + response), S prompt length,
T generated length, V vocabulary size, E hidden size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

import plumbing
from plumbing import UserError, first_line


# --------------------------------------------------------------------------------------------
# 1. Tokenizer, prompt template, SFT examples and padding
# --------------------------------------------------------------------------------------------


PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"  # safe_rlhf/configs/constants.py@82743cc:L35-53
# The official code adds "<pad>" when a tokenizer has none (safe_rlhf/models/pretrained.py@82743cc:L45-146).
DEFAULT_PAD_TOKEN = "<pad>"


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

    plumbing.quiet_hf()
    assert padding_side in ("left", "right"), padding_side
    name = str(name_or_path)  # a missing path, not a hub name such as "gpt2" or "org/name"
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or "/" in name and Path(name).parent.is_dir()):
        raise UserError(f"{name_or_path} does not exist" + (f" ({stage_hint})" if stage_hint else ""))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = f" ({stage_hint})" if stage_hint else ""
        raise UserError(f"cannot load a tokenizer from {name_or_path!s}{hint}: {first_line(e)}") from None
    # PAD must differ from EOS: if they were equal, the attention mask would hide every EOS and the
    # end score would be read one token early (docs/reference.md, "The end token").
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


def check_same_vocabulary(tokenizer, name_or_path: str, flag: str, trust_remote_code: bool = False) -> None:
    """A model scores the actor's token ids, so its own tokenizer (saved in its folder) must map every
    token to the same id: the same size is not enough. A preset or a folder without one is not checked."""
    if name_or_path not in PRESETS and any((Path(name_or_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        if load_tokenizer(name_or_path, "right", trust_remote_code).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{flag} {name_or_path} was trained with another tokenizer than the actor's (its "
                            "vocabulary maps tokens to other ids); re-tokenisation is not implemented")


def resize_embeddings(model: nn.Module, tokenizer) -> None:
    """Grow the embedding (and LM head) to the tokenizer; new rows are the mean of the old ones,
    as the official code does (safe_rlhf/models/pretrained.py@82743cc:L45-146). Never shrinks (padded
    vocabularies stay)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    # Keep the config's special ids in sync with the tokenizer (safe_rlhf/models/pretrained.py@82743cc:L45-146).
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))


IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)


def tokenize_prompt_response(tokenizer, requests: list[str], responses: list[str], max_length: int):
    """SFT-style examples: BOS + template(request) + response + EOS string, right-truncated to
    max_length (which may cut the EOS); labels are IGNORE_INDEX on the prompt (BOS included), the
    token itself on the response and the EOS (safe_rlhf/datasets/supervised.py@82743cc:L54-66). Returns
    ([{input_ids, labels, truncated}], number truncated)."""
    prompts = [format_prompt(r) for r in requests]
    all_ids = tokenizer([p + r + tokenizer.eos_token for p, r in zip(prompts, responses)],
                        add_special_tokens=True)["input_ids"]
    prompt_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    examples, truncated = [], 0
    for ids, n_prompt in zip(all_ids, prompt_lengths):
        truncated += len(ids) > max_length
        examples.append({"input_ids": ids[:max_length], "truncated": len(ids) > max_length,
                         "labels": [IGNORE_INDEX] * min(n_prompt, len(ids), max_length) + ids[n_prompt:max_length]})
    return examples, truncated


def right_pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids (or labels) with `value` to the longest one (training and scoring:
    every row starts at column 0). -> tensor (B, L), attention_mask (B, L) 1 on real entries."""
    L = max(map(len, rows))
    padded = torch.full((len(rows), L), value, dtype=torch.long)                    # (B, L)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)                  # (B, L)
    for b, r in enumerate(rows):
        padded[b, :len(r)], attention_mask[b, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return padded, attention_mask


def collate_right(examples: list[dict], pad_token_id: int):
    """Right-pad {input_ids, labels} rows to the longest one. -> input_ids, attention_mask, labels (B, L)."""
    input_ids, attention_mask = right_pad([e["input_ids"] for e in examples], pad_token_id)   # (B, L)
    labels, _ = right_pad([e["labels"] for e in examples], IGNORE_INDEX)                     # (B, L)
    return input_ids, attention_mask, labels


def left_pad(rows: list[list[int]], pad_token_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: the prompt's last token sits in the last column, so new
    tokens append to every row at once. length: pad to this many columns (default the longest).
    -> input_ids (B, S), attention_mask (B, S)"""
    S = max(map(len, rows)) if length is None else length
    input_ids = torch.full((len(rows), S), pad_token_id, dtype=torch.long)           # (B, S)
    attention_mask = torch.zeros((len(rows), S), dtype=torch.long)                  # (B, S)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[b, S - len(r):] = 1
    return input_ids, attention_mask


def encode_prompts(tokenizer, requests: list[str], max_length: int | None = None) -> list[list[int]]:
    """BOS + template(request) for each request; with max_length, prompts longer than that keep
    their end (truncated on the left: the question's end and 'ASSISTANT:' matter most)."""
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        return tokenizer([format_prompt(r) for r in requests], add_special_tokens=True,
                         truncation=max_length is not None, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side


# --------------------------------------------------------------------------------------------
# 2. Policy: a causal LM from a checkpoint, or a tiny LLaMA from a preset
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



def checkpoint_kind(name_or_path: str | os.PathLike) -> str | None:
    """What a local checkpoint folder holds: its saved score_type (reward, cost or critic), else
    "policy" (any causal LM, a hub download included). None: a preset or a hub name (nothing to read)."""
    cfg = Path(name_or_path) / "config.json"
    return json.loads(cfg.read_text()).get("score_type", "policy") if cfg.is_file() else None


def check_kind(name_or_path: str, accept: tuple[str, ...], flag: str) -> None:
    """Refuse a checkpoint that fills the wrong slot (a cost model given as the reward model, a
    policy as a frozen score model: its head would be random), naming the flag and both kinds."""
    kind = checkpoint_kind(name_or_path)
    if kind is not None and kind not in accept:
        raise UserError(f"{flag} {name_or_path} is a {kind} model; {flag} takes a {' or '.join(accept)} model")



def looks_local(name_or_path: str) -> bool:
    """A path, not a hub name 'org/name': it exists, starts like a path, or its parent folder exists
    here (runs/nonexistent is a missing folder, not a model on the hub)."""
    p = Path(name_or_path)
    return p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or p.parent.is_dir()


def check_checkpoint_path(name_or_path: str, stage_hint: str = "") -> None:
    """A local-looking path must be a checkpoint folder; a hub name ('org/name') is left to HF."""
    p, hint = Path(name_or_path), f" ({stage_hint})" if stage_hint else ""
    if not looks_local(name_or_path):
        return
    if not p.exists():
        raise UserError(f"checkpoint {name_or_path} does not exist{hint}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"{name_or_path} is not a checkpoint folder: no config.json{hint}")
    if not any(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").is_file():
        raise UserError(f"{name_or_path} is not a checkpoint folder: no *.safetensors weights{hint}")



def load_causal_lm(name_or_path: str, tokenizer, *, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False, stage_hint: str = "", device: str | torch.device = "cpu",
                   meta: bool = False, flag: str = "the policy"):
    """A policy: a named preset (random init; same weights on every rank because every rank uses
    the same seed before this call) or any HF decoder-only causal LM checkpoint.

    meta=True builds only the skeleton on the meta device (no memory, no disk reads): under
    torchrun every rank but 0 does this, and prepare_model broadcasts rank 0's weights into the
    shards, so an 8-GPU node holds one CPU copy of each checkpoint instead of eight.
    flag: the argument that named it, for the one-line error when it holds a score model."""
    from transformers import AutoModelForCausalLM

    check_kind(name_or_path, ("policy",), flag)
    with plumbing.on_every_rank():  # rank 0 alone reads the weights: its refusal must reach the others
        if meta:
            return _skeleton(AutoModelForCausalLM, name_or_path, tokenizer, dtype, trust_remote_code, stage_hint)
        if name_or_path in PRESETS:
            model = AutoModelForCausalLM.from_config(preset_config(name_or_path, vocab_size=len(tokenizer)))
            model.to(dtype)
        else:
            check_checkpoint_path(name_or_path, stage_hint)
            model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype, trust_remote_code, stage_hint, device=device)
    resize_embeddings(model, tokenizer)
    return model


def weight_scale(model: nn.Module) -> float:
    """The largest absolute weight of a loaded model (a LLaMA's norm weights make it at least 1)."""
    return max((p.detach().abs().max().item() for p in model.parameters() if p.is_floating_point() and p.numel()),
               default=0.0)


def check_max_length(model: nn.Module, max_length: int, longest: int | None = None, flag: str = "--max_length") -> None:
    """Sequences past the model's position table would use positions it never learnt (RoPE extrapolates
    without a word): refused in one line. longest: the longest sequence the data give at this
    max_length (a supervised stage); None: max_length itself may be reached (a rollout)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max_length if longest is None else longest
    if positions is not None and longest > positions:
        reach = "" if longest == max_length else f" lets sequences reach {longest} tokens, which"
        raise UserError(f"{flag} {max_length}{reach} exceeds the model's {positions} positions "
                        f"(max_position_embeddings); use {flag} {positions} or less")


def _skeleton(auto_cls, name_or_path, tokenizer, dtype, trust_remote_code, stage_hint, score_type=None):
    """The model's modules with meta tensors: shapes only, from the preset or the checkpoint config."""
    from transformers import AutoConfig

    if name_or_path in PRESETS:
        config = preset_config(name_or_path, vocab_size=len(tokenizer))
    else:
        check_checkpoint_path(name_or_path, stage_hint)
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


def _from_pretrained(auto_cls, name_or_path, dtype, trust_remote_code, stage_hint="", device="cpu", config=None):
    """HF loading that refuses what it cannot load, in one line: a missing folder and no hub, a
    corrupt weights file, weights that do not fit the config (another architecture: HF would leave
    the missing tensors randomly initialised). A head it does not use (lm_head, score_head) is fine."""
    hint = f" ({stage_hint})" if stage_hint else ""
    try:
        model, info = auto_cls.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, config=config,
            device_map=str(device) if device != "cpu" else None, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SafetensorError...: the message is what matters
        where = "" if Path(name_or_path).exists() else "not a local checkpoint folder, and the hub says: "
        raise UserError(f"cannot load model from {name_or_path}: {where}{first_line(e)}{hint}") from None
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(("lm_head.", "score_head."))]
    for what, keys in (("missing", info.get("missing_keys", [])), ("unexpected", unexpected),
                       ("wrongly shaped", info.get("mismatched_keys", []))):
        if keys:
            raise UserError(f"cannot load model from {name_or_path}: {len(keys)} {what} weights for its config "
                            f"({type(model).__name__}), e.g. {sorted(map(str, keys))[0]}: not this architecture{hint}")
    return model


# --------------------------------------------------------------------------------------------
# 3. ScoreModel: reward model, cost model, reward critic, cost critic
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
        # Head initialisation (safe_rlhf/models/score_model/__init__.py@82743cc:L135-137): weight ~ N(0,
        # initializer_range) as HF's
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
        if packed:
            check_packing(self)  # reward.py refuses before training; this guards every other caller
            mask = packed_attention_mask(attention_mask, self.model.config._attn_implementation,
                                         next(self.model.parameters()).dtype)
            masking = {"attention_mask": mask, "position_ids": position_ids}
        else:
            masking = backbone_masking(attention_mask, right_padded)
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
        """The backbone config plus what says 'this is a score model' (docs/reference.md, "Saving a score model")."""
        cfg = self.config.to_dict()
        family = type(self.model).__name__.removesuffix("Model")
        cfg.update(architectures=[f"{family}ForScore"], score_type=self.score_type, score_dim=1, score_bias=True)
        return cfg


# Attention implementations that honour a 4D mask of packed rows, and the form each needs it in.
PACKING_BACKENDS = ("sdpa", "eager")


def check_packing(model: nn.Module, flag: str = "--share_prompt") -> None:
    """Refuse packed pairs on a backend that cannot take their 4D mask (e.g. flash attention, which
    knows only padding), in one line, before training: its scores would be silently wrong."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in PACKING_BACKENDS:
        raise UserError(f"{flag}: packed pairs need a 4D attention mask, which {implementation} attention does not "
                        f"take; give --no-share_prompt (or load the model with {' or '.join(PACKING_BACKENDS)})")


def packed_attention_mask(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A packed row's (B, 1, L, L) boolean mask (True = may attend) in the form the backend honours.
    transformers hands a 4D mask to the attention unchanged: SDPA reads a boolean mask as such, but
    eager attention ADDS it to the logits (True = +1, False = +0, so nothing would be masked and the
    second response would see the first); it gets 0 where attending and the dtype's lowest number
    elsewhere, which softmax turns into an exact 0."""
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)  # (B, 1, L, L)
    return mask                                                                        # (B, 1, L, L) bool


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B,) index of the last 1 in each row, whatever side is padded
    (safe_rlhf/models/score_model/__init__.py@82743cc:L197). Plain loop it replaces: max(t for t in range(L) if
    mask[b, t])."""
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
    padded one (what HF `generate` does; the official forward passes skip this, docs/reference.md, "Position ids")."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                          # (B, L)


def load_score_model(name_or_path: str, tokenizer, score_type: str, *, dtype: torch.dtype = torch.float32,
                     trust_remote_code: bool = False, stage_hint: str = "", meta: bool = False,
                     accept: tuple[str, ...] | None = None, flag: str = "") -> ScoreModel:
    """From a saved score model (trained head restored) or from a causal-LM checkpoint / preset
    (fresh head). `score_type` overrides the saved one (a critic loaded from a reward model).
    accept: the kinds this slot takes (checkpoint_kind), refused in one line naming `flag`.
    meta=True: the skeleton only, as in load_causal_lm."""
    from transformers import AutoConfig, AutoModel

    if accept is not None:
        check_kind(name_or_path, accept, flag)
    with plumbing.on_every_rank():  # rank 0 alone reads the weights: its refusal must reach the others
        if meta:
            return _skeleton(AutoModel, name_or_path, tokenizer, dtype, trust_remote_code, stage_hint, score_type)
        if name_or_path in PRESETS:
            backbone = AutoModel.from_config(preset_config(name_or_path, vocab_size=len(tokenizer))).to(dtype)
            model = ScoreModel(backbone, score_type)
        else:
            check_checkpoint_path(name_or_path, stage_hint)
            if checkpoint_kind(name_or_path) in SCORE_TYPES:
                # The saved config is the backbone's plus score fields; AutoModel ignores the extras and
                # loads the "model.*" weights (HF strips the base-model prefix), the head is read below.
                config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
                config.architectures = None
                backbone = _from_pretrained(AutoModel, name_or_path, dtype, trust_remote_code, stage_hint, config=config)
                model = ScoreModel(backbone, score_type)
                head = _read_tensors(Path(name_or_path), ("score_head.weight", "score_head.bias"))
                model.score_head.load_state_dict({k.removeprefix("score_head."): v.to(dtype) for k, v in head.items()})
            else:
                backbone = _from_pretrained(AutoModel, name_or_path, dtype, trust_remote_code, stage_hint)
                model = ScoreModel(backbone, score_type)
    resize_embeddings(model, tokenizer)
    return model


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
# 4. Distributed set-up, written by hand (torchrun -> process group -> FSDP2)
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
    """The last line of a torchrun script, once main() has returned: wait for every rank, destroy the
    process group, and end the process (plumbing.exit_now says why at once). Without the barrier a rank
    that finishes first tears gloo down while rank 0 is still writing, and the others abort. A plain
    `python x.py` has no process group: this returns, and Python exits as usual."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        plumbing.exit_now(0)


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


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The sum, mean or max of a tensor over ranks (identity without a process group)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            x /= dist.get_world_size()
    return x


def gather_in_order(results: dict[int, object], n: int) -> list:
    """{item index: result} from every rank -> the list of all n results, in item order (each rank
    computed some of the items; see plumbing.rank_batches). Identity in one process."""
    parts = [results]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, results)
    merged = {i: r for part in parts for i, r in part.items()}
    assert sorted(merged) == list(range(n)), "every item exactly once"
    return [merged[i] for i in range(n)]


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
    Dropout is switched off everywhere (RLHF log-prob ratios must be deterministic). A trained model
    remembers its largest weight as loaded (on rank 0, which holds the weights and writes the saves):
    the bound save_checkpoint checks diverged weights against.
    """
    if trainable and dist_.is_main:
        model.initial_weight_scale = weight_scale(model)
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


def autocast(d: Dist):
    """bf16 compute for a single GPU process (no FSDP mixed-precision policy there); under torchrun
    FSDP2's policy already computes in bf16; on CPU everything stays fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda" and not d.enabled)


# --------------------------------------------------------------------------------------------
# 5. Checkpoints: every rank writes its share of the files at once, read back on any number of ranks
# --------------------------------------------------------------------------------------------


def sharded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as each rank holds it: FSDP2's DTensor shards (plain tensors in one
    process), nothing gathered. A weight tied to an earlier one (lm_head = embed_tokens) is kept once,
    as Hugging Face saves it. Collective under FSDP (call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    seen, out = set(), {}
    for name, tensor in get_model_state_dict(model).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def write_whole_files(folder: Path, tensors: dict[str, torch.Tensor], d: Dist) -> None:
    """Whole tensors from every rank's shards into safetensors files, every rank writing its share at
    once. Collective. plumbing.file_buckets cuts the tensors into N files (none over
    plumbing.SHARD_FILE_BYTES, one per rank or more for a model of any size); file k belongs to rank
    (k - 1) % W. The files are written W at a time: every rank sends its shard of each tensor to the
    file's rank (gather_whole), then every rank writes the file it holds (safetensors save_file, straight
    from the tensors). No rank ever holds more than one file's whole tensors, and nothing goes through
    rank 0. One file is model.safetensors; N are model-0000k-of-0000N.safetensors with rank 0's
    model.safetensors.index.json (Hugging Face's names, which any number of ranks can read back in
    slices: plumbing.read_resharded)."""
    from safetensors.torch import save_file

    if not tensors:
        return
    files = plumbing.file_buckets(tensors, d.world_size)
    n = max(files.values())
    name = (lambda k: "model.safetensors") if n == 1 else (lambda k: f"model-{k:05d}-of-{n:05d}.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(1, n + 1, d.world_size):         # files first .. first + W - 1: one per rank
        mine = {}                                       # the whole tensors of the file this rank writes
        for key, k in files.items():
            if first <= k < first + d.world_size:
                whole = gather_whole(tensors[key], (k - 1) % d.world_size, d)
                if whole is not None:
                    mine[key] = whole
        if mine:
            save_file(mine, str(folder / name(files[next(iter(mine))])), metadata={"format": "pt"})
        del mine
    if d.is_main and n > 1:
        sizes = {key: t.numel() * t.element_size() for key, t in tensors.items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {key: name(k) for key, k in files.items()}}, indent=2) + "\n")


def gather_whole(tensor: torch.Tensor, to: int, d: Dist) -> torch.Tensor | None:
    """The whole tensor on rank `to` (None on the others), on the CPU. FSDP2 shards dim 0 in chunks of
    ceil(dim0 / W) rows (the last ranks may hold fewer, or none): each rank pads its chunk to that size,
    one gather, and rank `to` concatenates the chunks and drops the padding. Collective; one process:
    the tensor itself."""
    if not hasattr(tensor, "to_local"):  # one process, or a tensor every rank holds whole (AdamW's step)
        return tensor.detach().cpu() if d.rank == to else None
    if not (tensor.ndim and len(tensor.placements) == 1 and tensor.placements[0].is_shard(0)):
        whole = tensor.full_tensor()     # not FSDP2's layout: gather it the general way
        return whole.cpu() if d.rank == to else None
    local, rows = tensor.to_local().detach(), tensor.shape[0]
    chunk = math.ceil(rows / d.world_size)
    padded = local.new_zeros((chunk, *tensor.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(d.world_size)] if d.rank == to else None
    dist.gather(padded, parts, dst=to)
    return torch.cat(parts)[:rows].cpu() if d.rank == to else None


def write_model_config(folder: Path, model: nn.Module, tokenizer) -> None:
    """Rank 0: what a Hugging Face folder holds besides its weights: config.json (a score model's
    score_config) and generation_config.json, and the tokenizer files."""
    if isinstance(model, ScoreModel):
        (folder / "config.json").write_text(json.dumps(model.score_config(), indent=2, sort_keys=True) + "\n")
    else:
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_checkpoint(folder: str | os.PathLike, dist_: Dist, tokenizer, models: dict[str, nn.Module],
                    train_state: dict | None = None) -> None:
    """Save one or more models (and optionally a resumable train state) atomically, every rank writing
    its own shards at once. Collective: every rank must call it.

    models: {"": main model, "reward_critic": ..., ...}; "" goes in the folder itself, others in
    sub-folders, each a Hugging Face folder (its weights by write_whole_files, the rest by
    write_model_config).
    train_state: {"tensors": {name: Tensor} (small, the same on every rank: rank 0 writes them),
    "json": {...}, "shards": {name: {key: Tensor or DTensor}} (the AdamW moments, as each rank holds
    them: plumbing.optimizer_state; written whole by every rank at once into train_state/<name>/,
    write_whole_files)} or None.
    The whole save goes into a temporary sibling folder that replaces `folder` only once every rank
    has written everything (plumbing.atomic_folder on rank 0; the marker is written last): a kill at
    any moment leaves the previous checkpoint, which --resume then takes. The ranks must share a file
    system (one machine, or a cluster's shared storage)."""
    folder = Path(os.path.abspath(folder))
    check_weights(folder, dist_, models)  # a diverged model is never saved
    try:
        with plumbing.atomic_save(folder, dist_.is_main) as tmp:
            for name, m in models.items():
                write_whole_files(tmp / name if name else tmp, sharded_state_dict(m), dist_)
            for name, shards in (train_state or {}).get("shards", {}).items():
                write_whole_files(tmp / "train_state" / name, shards, dist_)
            if dist_.is_main:
                for name, m in models.items():
                    write_model_config(tmp / name if name else tmp, m, tokenizer)
                if train_state is not None:
                    plumbing.write_train_state(tmp, train_state)
    except (OSError, SafetensorError) as e:  # disk full, read-only: the previous checkpoint is untouched
        raise UserError(f"cannot save to {folder}: {plumbing.save_error_reason(e)}; it keeps its previous checkpoint") from None


def check_weights(folder: Path, dist_: Dist, models: dict[str, nn.Module]) -> None:
    """Refuse a diverged model before anything is written (plumbing.check_finite_weights), from each
    rank's own shards: every rank reports its largest |weight| per tensor (a NaN or an infinity where
    one is not finite), rank 0 takes the largest over ranks. Collective."""
    report = {}
    for name, m in models.items():
        report[name] = {}
        for key, tensor in sharded_state_dict(m).items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point() and local.numel():
                largest = torch.linalg.vector_norm(local, ord=math.inf).item()  # max |w| in one pass; NaN or inf if any is
                report[name][key] = largest if math.isfinite(largest) else math.nan
    reports = [report]
    if dist_.enabled:
        reports = [None] * dist_.world_size
        dist.all_gather_object(reports, report)
    with plumbing.on_every_rank():  # a refusal on rank 0 reaches the other ranks
        if dist_.is_main:
            largest = {name: {} for name in models}
            for r in reports:
                for name, per_key in r.items():
                    for key, value in per_key.items():
                        before = largest[name].get(key, 0.0)
                        largest[name][key] = math.nan if math.isnan(value) or math.isnan(before) else max(value, before)
            scales = {name: getattr(m, "initial_weight_scale", None) for name, m in models.items()}
            plumbing.check_finite_weights(largest, folder, scales)


# --------------------------------------------------------------------------------------------
# 6. Math helpers shared by several stages
# --------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1 (all positions pooled). (B, T), (B, T) -> ()"""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence token mean, then batch mean: the official `masked_mean` (safe_rlhf/utils.py@82743cc:L201-208).
    Plain loop: mean_b( sum_t m[b,t] x[b,t] / sum_t m[b,t] ).   (B, T), (B, T) -> ()"""
    per_sequence = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_sequence.mean()                                                # ()


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The one-token shift: logits at position t predict token t+1 (docs/reference.md, "Notation and
    the one-token shift"). Logits are divided by the sampling temperature before the log-softmax, so
    these are the log-probs of exactly the distribution `sample` draws from.
    (B, L, V), (B, L) -> (B, L-1), entry t = log pi(x_{t+1} | x_{<=t})."""
    logits = logits[:, :-1] / temperature                                   # (B, L-1, V)
    logp = F.log_softmax(logits.float(), dim=-1)                            # (B, L-1, V) in fp32
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)      # (B, L-1)


def policy_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float = 1.0, right_padded: bool = False) -> torch.Tensor:
    """Forward a causal LM and return sequence_logprobs (right_padded: see backbone_masking). (B, L) -> (B, L-1)"""
    logits = model(input_ids=input_ids, **backbone_masking(attention_mask, right_padded), use_cache=False).logits
    return sequence_logprobs(logits, input_ids, temperature)


def rollout_mask_step(token: torch.Tensor, finished: torch.Tensor, eos_token_id: int, pad_token_id: int,
                      unk_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rollout mask, one generated column at a time (sample's rule): given this column's tokens and
    which rows had ended before it, returns real (the token is part of the response), hole (a sampled
    UNK: not real, the row goes on) and the rows ended after it. A row ends after its EOS (kept) or at
    a sampled PAD (left out). The official mask, (id != PAD) & (id != UNK) over the whole sequence
    (safe_rlhf/trainers/rl_trainer.py@82743cc:L428-438), agrees except after a sampled PAD, where the
    official generation goes on. An unk_token_id equal to EOS or PAD (or None) makes no holes.
    token, finished: (B,) -> real, hole, finished: (B,) bool"""
    is_unk = token == unk_token_id if unk_token_id not in (None, eos_token_id, pad_token_id) else torch.zeros_like(finished)
    hole = ~finished & is_unk                                                        # (B,)
    real = ~finished & (token != pad_token_id) & ~hole                               # (B,)
    return real, hole, finished | (token == eos_token_id) | (token == pad_token_id)


# The static-cache path (sample(static_cache=True)): the KV cache and the attention mask are allocated
# once for S + max_new_tokens positions and written in place, so every decoding step has the same
# shapes and can be one compiled function (torch.compile mode "reduce-overhead": CUDA graphs on a GPU,
# the launch-bound decoding step replayed as one graph; HF generate's static cache and gpt-fast
# generate.py do the same). The sampling rule around the step is the same code for both paths.
_compiled_decode_step = None
# model -> ((B, S + N), its StaticCache), kept between calls only when compiled: CUDA graphs replay fixed addresses,
# so a new cache per rollout would re-record them. It holds the rollout's KV memory between rollouts.
_kept_caches = weakref.WeakKeyDictionary()


def decode_step(model: nn.Module, token: torch.Tensor, attention_mask: torch.Tensor, position: torch.Tensor,
                cache) -> torch.Tensor:
    """One decoding step with fixed shapes (what torch.compile wraps): this step's tokens (B, 1) at
    positions (B, 1), attending through the whole fixed-length mask (B, S + N) (columns not yet
    generated are 0); the StaticCache is written in place at the next column. -> next logits (B, V)"""
    return model(input_ids=token, attention_mask=attention_mask, position_ids=position,
                 past_key_values=cache, use_cache=True).logits[:, -1, :]


def compiled_decode_step(model: nn.Module, token, attention_mask, position, cache) -> torch.Tensor:
    """decode_step under torch.compile(mode="reduce-overhead"), compiled once per process (the
    shapes do not change between rollouts: S + N = --max_length). Each call is a new CUDA-graph step,
    and its output is copied out before the next replay overwrites it."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, mode="reduce-overhead")
    torch.compiler.cudagraph_mark_step_begin()
    return _compiled_decode_step(model, token, attention_mask, position, cache).clone()


def static_kv_cache(model: nn.Module, batch: int, length: int, keep: bool):
    """transformers' StaticCache for `length` positions (its keys and values are allocated at the
    first forward); keep: reuse the model's cache from the previous call when its sizes match."""
    from transformers import StaticCache

    kept = _kept_caches.get(model) if keep else None
    if kept is not None and kept[0] == (batch, length):
        kept[1].reset()                                     # zeroes its keys, values and lengths in place
        return kept[1]
    cache = StaticCache(config=model.config, max_cache_len=length)
    if keep:
        _kept_caches[model] = ((batch, length), cache)
    return cache


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_token_id: int, pad_token_id: int, unk_token_id: int | None = None, temperature: float = 1.0,
           generator: torch.Generator | None = None, static_cache: bool = False,
           compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of left-padded prompts with the KV cache.

    Draws from softmax(logits / temperature) with nothing hidden: no top-k, no top-p (the official
    rollout samples with HF's implicit top_k=50, safe_rlhf/trainers/rl_trainer.py@82743cc:L407-438, and then
    scores with the full softmax; we sample from the distribution we score). temperature == 0: greedy.
    After EOS a row gets PAD. Neither PAD nor UNK is ever a real token (the official rollout mask is
    ids != PAD and != UNK, rl_trainer.py@82743cc:L428-438): a sampled UNK (unk_token_id, unless it is EOS or
    PAD) is a hole, masked out, and generation goes on after it, positions counting real tokens only, as
    position_ids_from_mask counts them in every later forward (so what is scored is what was sampled);
    a sampled PAD ends the row, itself masked out (official: a hole too; docs/reference.md, "Other
    deviations"). Under torchrun every rank runs the same number of decoding steps (until all rows on
    all ranks are done): no hang.

    static_cache: the KV cache (transformers' StaticCache) and the attention mask are allocated once for
    S + max_new_tokens positions and filled in place, so every step has the same shapes (decode_step);
    compile (with static_cache): that step under torch.compile, CUDA graphs on a GPU. The same rule, the
    same generator draws in the same order: the same tokens and mask as the growing cache (tested on CPU
    in fp32; in bf16 on a GPU other kernels may round differently).

    input_ids, attention_mask: (B, S) left-padded.
    Returns sequences (B, S + T) and their attention mask (B, S + T), T <= max_new_tokens;
    the mask is 1 on real prompt tokens and on generated tokens up to and including EOS, except holes.
    """
    from transformers import DynamicCache

    B, S = input_ids.shape
    if dist.is_initialized():  # every rank must run the same number of steps: agree on the budget
        budget = torch.tensor([max_new_tokens], device=input_ids.device)
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
        max_new_tokens = int(budget.item())
    position_ids = position_ids_from_mask(attention_mask)                            # (B, S)
    if static_cache:  # fixed shapes: the mask's later columns are written as tokens come
        cache = static_kv_cache(model, B, S + max_new_tokens, keep=compile)
        mask = attention_mask.new_zeros(B, S + max_new_tokens)                       # (B, S + N)
        mask[:, :S] = attention_mask
        step = compiled_decode_step if compile else decode_step
    else:             # the cache and the mask grow by one column per step
        cache, mask, step = DynamicCache(), attention_mask, decode_step             # mask (B, S)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True).logits[:, -1, :]          # (B, V)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)            # (B,)
    next_position = position_ids[:, -1] + 1                                          # (B,)
    new_tokens, new_mask = [], []
    for t in range(max_new_tokens):
        logits = logits.float()                                                      # (B, V)
        if temperature == 0:
            token = logits.argmax(dim=-1)                                            # (B,)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)                      # (B, V)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)     # (B,)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)  # PAD after the end
        real, hole, finished = rollout_mask_step(token, finished, eos_token_id, pad_token_id, unk_token_id)
        new_tokens.append(token)
        new_mask.append(real.long())
        # stop only when every row on every rank is done: sharded forwards stay in lockstep
        if all_reduce(torch.tensor([0.0 if finished.all() else 1.0], device=input_ids.device)).item() == 0.0:
            break
        if static_cache:
            mask[:, S + t] = real.long()                                             # (B, S + N), in place
        else:
            mask = torch.cat([mask, real.long()[:, None]], dim=1)                    # (B, S + t + 1)
        position = next_position - hole.long()                                       # (B,) a hole: the last real one's
        logits = step(model, token[:, None], mask, position[:, None], cache)         # (B, V)
        next_position = position + 1
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)       # (B, S + T)
    mask = torch.cat([attention_mask, torch.stack(new_mask, dim=1)], dim=1)         # (B, S + T)
    return sequences, mask
