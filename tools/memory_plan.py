"""tools/memory_plan.py: per-rank memory of PPO-Lagrangian's six models (or the critic-free
rloo_lagrangian.py's four, or dpo.py's policy and reference) under FSDP2, from a model config.

The six models are built on the meta device as ppo_lagrangian.py builds them (actor and reference:
AutoModelForCausalLM; reward model, cost model and both critics: model.ScoreModel over AutoModel), so
every parameter count below is read from real module shapes, never from a formula. Memory is then
counted per rank for what model.prepare_model, model.make_optimizer and ppo_lagrangian.py's loop do.

Persistent (sharded over W ranks; FSDP2 pads every parameter's dim 0 to a multiple of W, so a rank
holds ceil(dim0 / W) rows of each):
  actor, reward critic, cost critic   fp32 master weights 4 B + fp32 gradients 4 B + AdamW exp_avg and
                                      exp_avg_sq 8 B per parameter, / W. Gradients stay allocated from one
                                      step to the next: zero_grad(set_to_none) runs after the next forward.
  reference, reward model, cost model bf16 weights 2 B per parameter / W on GPU (fp32 4 B on CPU).
  frozen roots left gathered          FSDP2 never reshards a root module after a forward that has no
                                      backward (fully_shard's default for the root), so after its first
                                      forward each frozen model keeps its embeddings, final norm and head
                                      unsharded: root parameters x 2 B, on every rank.
Transient, by phase (each phase = persistent + its own transients; the plan's peak is the max):
  rollout        model.gathered_weights keeps the whole actor unsharded (bf16) for the whole generation;
                 the KV cache (transformers' DynamicCache, grown by torch.cat, so one layer's keys exist twice
                 for a moment): 2 x layers x P x L x kv_heads x head_dim x c bytes.
  scoring        no-grad forwards of all six models over the P x L rollout batch, one at a time; the
                 largest is the actor's or the reference's logits chain (below).
  actor update   at the end of the forward: the activations autograd saves over a train micro-batch of
                 B x L tokens (formula in `layer_activation_bytes`), the logits chain, and both critics' roots
                 still unsharded from scoring (the actor's own root reshards after each forward: that is how
                 gathered_weights leaves it); or, if larger, the start of the backward or the backward of
                 the last layer (re-computed under gradient checkpointing). The AdamW step adds nothing
                 on GPU (the fused kernel model.make_optimizer picks on CUDA) and one parameter's
                 temporaries on CPU (tensor by tensor): never a peak.
  critic update  the same without the vocabulary-sized tensors (the score head reads the hidden state).
The logits chain of model.policy_logprobs, per token: logits (c V) -> logits / temperature (c V) -> .float()
(4 V, a copy only when c = 2) -> log_softmax (4 V, saved for backward): 12 V bytes when c = 2 and when
c = 4 (then .float() is free); in the backward, log_softmax's saved output, the gather's gradient and
log_softmax's gradient: 12 V again. With V = 32000 that is 384 kB per token, two LLaMA-7B layers' worth.

The save (a checkpoint: every --save_every rl_steps and at the end), CPU and GPU bytes per rank, for two
schemes (formulas in `gathered_save_bytes` and `sharded_save_bytes`; N: a trained model's parameters):
  gathered       the previous version's model.save_checkpoint (commit b9c3857, kept as the "before"):
                 every trained model's fp32 weights and AdamW moments gathered whole to rank 0's CPU
                 (full_state_dict=True, cpu_offload=True) and cloned: 12 B x N per trained model stay,
                 plus the last model's gathered weights before their clone (4 B x N). On the GPU: one
                 tensor at a time, all-gathered.
  sharded        this version's: check_weights (a one-pass reduction per local shard, no temporary),
                 then model.write_whole_files for every trained model's weights, then for its AdamW
                 moments: plumbing.file_buckets cuts them into files of whole tensors (at most
                 SHARD_FILE_BYTES, 2 GiB, unless one tensor alone is larger; at least W while files stay
                 over MIN_FILE_BYTES); file k belongs to rank (k - 1) % W and W files are written at a
                 time: each tensor is gathered whole to its file's rank (every rank's chunk padded to
                 ceil(dim0 / W) rows, dist.gather into W parts, torch.cat, .cpu()), which keeps its
                 file's tensors until it writes them with safetensors' save_file (from the tensors'
                 memory: no serialised copy). Per rank: on the CPU, the whole tensors of one file; on
                 the GPU, one tensor's padded chunk and, on its file's rank, the W chunks and their
                 concatenation (2 x the padded whole tensor). The plan shows the ranks that hold the most.
On a CPU run (--no-bf16, --measure) the "GPU" state and the CPU copies share one memory: the save's
bytes are then persistent + the CPU moment; .cpu() is then the tensor itself, so a rank keeps each
gathered tensor as the padded concatenation, and a tensor that is not a DTensor costs nothing.

rloo_lagrangian.py (--stage rloo_lagrangian) holds the same minus the two critics: no critic states,
no critic values in scoring, no critic roots kept through the actor update, no critic update; its
rollout and scoring run on its P x K sequences (P prompts, K answers each).

dpo.py (--stage dpo; DPO, SafeDPO, MoCAN, SACPO) holds a policy trained as the actor is and a reference
frozen as PPO's is (its root left gathered), nothing else. Its one phase, "update", is a micro-batch of
B pairs, 2B right-padded rows of L tokens: the actor update's formulas at 2B rows, with the policy's root
kept gathered from its forward to its backward (FSDP2's default for a root: the policy never goes through
gathered_weights), and one more moment before them: the reference's no-grad forward over the same rows
(dpo.py runs it first, so its logits chain is freed before the policy's graph exists). --method mocan adds
"offline (mocan)" (dpo.mocan_offline, run by start_training after prepare_model and before
make_optimizer: the policy's fp32 weights exist, its gradients and AdamW moments not yet): the reward and
cost models' shards, the reference gathered whole for generation (gathered_weights) with a KV cache of
mocan_batch_size x mocan_samples sequences, then the score models' no-grad forwards over those samples
and over the pairs (dpo.Args' per_device_eval_batch_size of them). After gathered_weights the
reference's root reshards after every forward; the training phase still counts it as left gathered (an
upper bound, one root). The save is the same code for the one trained model. Defaults: dpo.Args'.

Not counted: kernels' internal scratch buffers, CUDA allocator fragmentation and the CUDA/NCCL
context (leave a few GiB), the rollout arrays of shape (P, L) (kilobytes), AdamW's step counters (on
the CPU), and the save's small objects (state-dict keys, the JSON train state, RNG states, the
safetensors headers).

The check: `--measure` runs ppo_lagrangian.py itself on a small random-init LLaMA on CPU under a
dispatch-mode counter of live tensor storages (`LiveTensorBytes`) and prints the measured peak per
phase next to this estimate for the same config (fp32, `bf16=False`). Its "saving" row is the save
the code makes (this version's sharded save, on the rank measured): live tensor bytes (on a CPU run
the persistent state plus every CPU copy); the files save_file writes on that rank are compared with
the estimate's. The save's Python allocations are traced apart (tracemalloc) and printed: small
objects only, since save_file writes from the tensors' memory.

Run:
    python -m tools.memory_plan --model llama-7b --world_size 8 --gpu_memory_gib 80
    python -m tools.memory_plan --model llama-7b --world_size 8 --gpu_memory_gib 80 --gradient_checkpointing
    python -m tools.memory_plan --model runs/sft --world_size 2            # a checkpoint folder's config.json
    python -m tools.memory_plan --model llama-7b --world_size 8 --stage rloo_lagrangian   # 4 models, 4 prompts x 4
    python -m tools.memory_plan --model llama-7b --world_size 8 --stage dpo               # policy + reference
    python -m tools.memory_plan --model llama-7b --world_size 8 --stage dpo --method mocan  # + the offline phase
    python -m tools.memory_plan --measure                                   # estimate vs measurement, 1 CPU process
    python -m tools.memory_plan --measure --stage rloo_lagrangian
    torchrun --nproc_per_node 2 -m tools.memory_plan --measure              # the same, FSDP2 over 2 CPU ranks

Shape letters: P prompts per rank per rollout, B sequences per train micro-batch, L = max_length,
S prompt length, h hidden size, i intermediate size, a attention heads, d head dim, V vocabulary,
W world size; c bytes per element of the compute dtype (2 for bf16, 4 for fp32).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model as M
import plumbing
from plumbing import UserError

GiB = 1 << 30
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
TRAINED = ("actor", "reward_critic", "cost_critic")
FROZEN = ("reference", "reward_model", "cost_model")
STAGES = {"ppo_lagrangian": TRAINED, "rloo_lagrangian": ("actor",), "dpo": ("policy",)}   # each stage's trained models
FROZEN_OF = {"ppo_lagrangian": FROZEN, "rloo_lagrangian": FROZEN, "dpo": ("reference",)}  # ... and its frozen ones
MEASURED = ("ppo_lagrangian", "rloo_lagrangian")   # the stages --measure can run
METHODS = ("dpo", "safedpo", "mocan", "sacpo")     # dpo.py's --method: only mocan changes the memory (its offline phase)

# --------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------


@dataclass
class Args:
    # Ranges checked at parse time (plumbing.check_limits); any other number must be finite and >= 0.
    LIMITS: ClassVar[dict] = dict.fromkeys(("world_size", "per_device_prompt_batch_size", "per_device_train_batch_size",
                                        "max_length", "prompt_length"), (1, None)) | {"samples_per_prompt": (2, None)}

    model: str = "llama-7b"
    """a preset (model.PRESETS), a checkpoint folder or a hub name: only its config is read"""
    world_size: int = 8
    """ranks (GPUs) under torchrun"""
    fsdp: bool = True
    """torchrun + FSDP2, also for one rank; --no-fsdp: one plain process (CPU only, with --no-bf16)"""
    gpu_memory_gib: float = 80.0
    """memory of one GPU, to say whether the plan fits"""
    stage: str = "ppo_lagrangian"
    """ppo_lagrangian (six models), rloo_lagrangian (four: no critics) or dpo (a policy and its reference)"""
    method: str = "dpo"
    """dpo only: dpo.py's --method (dpo, safedpo, mocan, sacpo); mocan adds its offline phase"""
    mocan_batch_size: int | None = None
    """dpo --method mocan: prompts per rank per sampling batch; default dpo.Args' (16)"""
    mocan_samples: int | None = None
    """dpo --method mocan: K, samples of the reference per prompt; default dpo.Args' (8)"""
    per_device_prompt_batch_size: int | None = None
    """P: prompts per rank per rollout; default the stage's paper recipe: 16 (official, safe-rlhf
    scripts/ppo-lag.sh@82743cc:L148-198), rloo_lagrangian 4 (x K = the same 16 sequences)"""
    samples_per_prompt: int = 4
    """K: answers per prompt (rloo_lagrangian only)"""
    per_device_train_batch_size: int = 16
    """B: sequences per rank per rl_step (official 16); dpo: pairs per micro-batch (dpo.Args' 16: 2B rows)"""
    max_length: int = 512
    """L: prompt + response tokens (official 512); rollouts are assumed to reach it"""
    prompt_length: int = 128
    """S: padded prompt length (ppo_lagrangian.py truncates prompts to max_length / 2)"""
    gradient_checkpointing: bool = False
    """as ppo_lagrangian.py's flag (the official 7B script turns it on)"""
    bf16: bool = True
    """what ppo_lagrangian.py does on GPU: bf16 frozen models, bf16 compute under FSDP; --no-bf16: the CPU path"""
    measure: bool = False
    """instead, run ppo_lagrangian.py on a small config on CPU and print measured vs estimated per phase
    (its own sizes: MEASURE_RUN; --gradient_checkpointing applies; works under torchrun)"""


# --------------------------------------------------------------------------------------------
# Parameter counts from meta skeletons
# --------------------------------------------------------------------------------------------


def load_config(name_or_path: str):
    """A preset's LlamaConfig (its own vocabulary), or the config.json of a folder or hub name."""
    if name_or_path in M.PRESETS:
        return M.preset_config(name_or_path)
    from transformers import AutoConfig

    if (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1) and not Path(name_or_path).is_dir():
        raise UserError(f"--model {name_or_path}: not a preset ({', '.join(M.PRESETS)}) and no such folder")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name_or_path}: cannot read its config: {plumbing.first_line(e)}") from None


def meta_models(config, stage: str = "ppo_lagrangian", scorers: bool = True) -> dict[str, nn.Module]:
    """The models of ppo_lagrangian.py (six) or rloo_lagrangian.py (four) as model.py's `_skeleton`
    builds them: shapes only. dpo.py: the policy and the reference, and (scorers: --method mocan's
    offline phase) the reward and cost models."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.architectures = None
    with torch.device("meta"):
        models = {STAGES[stage][0]: AutoModelForCausalLM.from_config(config),
                  "reference": AutoModelForCausalLM.from_config(config)}
        if scorers:
            models |= {"reward_model": M.ScoreModel(AutoModel.from_config(config), "reward"),
                       "cost_model": M.ScoreModel(AutoModel.from_config(config), "cost")}
        for name in STAGES[stage][1:]:  # the critics
            models[name] = M.ScoreModel(AutoModel.from_config(config), "critic")
    return models


@dataclass
class ModelSize:
    """Parameter counts of one model. The *_shard counts are what rank 0 holds under FSDP2 over W ranks:
    FSDP2 pads each tensor's dim 0 to a multiple of W, so a rank holds ceil(dim0 / W) rows of it (rank 0
    always a full chunk; the padding sits on the last ranks), and an all-gathered tensor is W such chunks."""
    numel: int         # parameters of the whole model (tied weights once)
    shard: int         # all parameters
    root_shard: int    # outside the decoder layers (embeddings, final norm, LM or score head): FSDP2's root unit
    head_shard: int    # root parameters whose gradients exist through the whole backward: all but an
                       # untied input embedding (its gradient comes last)
    layer_shard: int   # one decoder layer: the other FSDP2 units (prepare_model shards each layer, then the root)
    largest: int = 0          # the largest parameter tensor (elements): what a save holds one at a time
    largest_padded: int = 0   # the same all-gathered with FSDP2's padding: W x ceil(dim0 / W) rows
    largest_shard: int = 0    # rank 0's rows of it


def model_size(model: nn.Module, world_size: int) -> ModelSize:
    """Counted from the module's parameters."""
    def shard(params) -> int:
        return sum(math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) for p in params)

    layers = M.decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_layers]
    embedding, head = model.get_input_embeddings().weight, getattr(model, "lm_head", None)
    tied = head is not None and head.weight is embedding
    largest = max(model.parameters(), key=lambda p: p.numel())
    return ModelSize(numel=sum(p.numel() for p in model.parameters()), shard=shard(model.parameters()),
                     root_shard=shard(root), head_shard=shard(p for p in root if tied or p is not embedding),
                     layer_shard=max(shard(layer.parameters()) for layer in layers), largest=largest.numel(),
                     largest_padded=world_size * shard([largest]), largest_shard=shard([largest]))


# --------------------------------------------------------------------------------------------
# Activations, logits and KV cache (bytes; the formulas are in the docstrings)
# --------------------------------------------------------------------------------------------


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_activation_bytes(config, batch: int, length: int, c: int) -> int:
    """What autograd saves in one LLaMA decoder layer (transformers' LlamaDecoderLayer, SDPA
    attention with a padding mask) for batch x length tokens, compute dtype of c bytes. Per token:

        2 RMSNorms   2 (4h + 4 + 2ch)  the input upcast to fp32 and 1/rms (LlamaRMSNorm computes in fp32),
                                       the normalised input and the norm's output in the compute dtype
        attention    4ch + 4a + cL     q, k, v as SDPA receives them (k, v repeated to all a heads: with a
                                       mask transformers' use_gqa_in_sdpa is off), the output (o_proj's input,
                                       same storage), the fp32 logsumexp, and the boolean padding mask that
                                       SDPA converts to an additive mask of L entries per query, per layer
        SwiGLU MLP   4ci               gate (SiLU's input), SiLU(gate), up, their product (down_proj's input)
        -----------  8h + 8 + 8ch + 4ci + 4a + cL

    RoPE saves only cos and sin, shared by all layers (counted once per model in `saved_activations`).
    This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 2: sbh(34 + 5as/h) bytes per layer for GPT in 16 bits) adapted to LLaMA: no dropout masks, no
    s x s attention scores (SDPA's fused kernels keep only the logsumexp), fp32 RMSNorm copies instead of
    16-bit LayerNorm inputs, SwiGLU's four i-wide tensors instead of GELU's 4h-wide input and output.
    Checked tensor by tensor with torch.autograd.graph.saved_tensors_hooks on CPU (fp32 and bf16).
    """
    h, i, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    return batch * length * (8 * h + 8 + 8 * c * h + 4 * c * i + 4 * a + c * length)


def saved_activations(config, batch: int, length: int, c: int, gradient_checkpointing: bool) -> dict[str, int]:
    """What the forward of a trained model saves for its backward, for batch x length tokens:
      decoder layers    without checkpointing, every layer's `layer_activation_bytes`; with it
                        (prepare_model -> HF activation_checkpointing_enable, one checkpoint per layer), each
                        layer's input (ch per token) and the boolean 4-D mask once (L bytes per token)
      final norm, RoPE  the final RMSNorm's 4h + 4 + 2ch per token (its output is the head's input) and
                        RoPE's cos and sin (2cd per token)"""
    h, d = config.hidden_size, head_dim(config)
    tokens = batch * length
    if gradient_checkpointing:
        layers = config.num_hidden_layers * tokens * c * h + tokens * length
    else:
        layers = config.num_hidden_layers * layer_activation_bytes(config, batch, length, c)
    return {"decoder layers": layers, "final norm, RoPE": tokens * (4 * h + 4 + 2 * c * h + 2 * c * d)}


def layer_backward_bytes(config, tokens: int, c: int) -> int:
    """Gradients alive in the backward of one layer's MLP beyond the activations it frees: the residual
    stream's gradient (ch), then the gradients of the product, of SiLU(gate) and of up (3ci) while
    down_proj's saved input (ci) is already freed: c (h + 2i) per token."""
    return tokens * c * (config.hidden_size + 2 * config.intermediate_size)


def no_grad_layer_bytes(config, tokens: int, c: int) -> int:
    """The largest working set inside one decoder layer in a no-grad forward: the residual, the MLP's
    input, and SiLU(gate), up and their product alive at once: c (2h + 3i) per token."""
    return tokens * c * (2 * config.hidden_size + 3 * config.intermediate_size)


def logits_chain_bytes(config, batch: int, length: int, c: int) -> int:
    """model.policy_logprobs at its widest: logits (B, L, V) in the compute dtype, logits[:, :-1] /
    temperature (B, L-1, V), its fp32 copy (only when c = 2: .float() of an fp32 tensor is itself) and
    log_softmax's fp32 output (B, L-1, V). The backward starts with the same 12 V bytes per token
    (log_softmax's saved output, the gather's gradient, log_softmax's gradient)."""
    V = config.vocab_size
    return batch * V * (c * length + c * (length - 1) + (4 if c == 2 else 0) * (length - 1) + 4 * (length - 1))


def kv_cache_bytes(config, batch: int, length: int, c: int) -> int:
    """DynamicCache after `length` positions: keys and values (B, kv_heads, length, d) per layer."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * length * kv_heads * head_dim(config) * c


# --------------------------------------------------------------------------------------------
# The save: per-rank CPU and GPU bytes of a checkpoint, the gathered scheme and the sharded one
# --------------------------------------------------------------------------------------------

SAVE_SCHEMES = ("gathered", "sharded")


def gathered_save_bytes(sizes: dict[str, ModelSize], trained: tuple[str, ...], fsdp: bool,
                        host_is_device: bool) -> dict[str, dict[str, dict[str, int]]]:
    """The previous version's save (model.save_checkpoint at commit b9c3857, before the sharded save:
    the "before" of the comparison; `--measure` can only run this version's), above the persistent
    state, at each of its moments. Returns {"cpu": {moment: {term: bytes}}, "gpu": {...}}, rank 0's (the other
    ranks take part in every all-gather and keep nothing: ranks_only=(0,)). N_k: model k's parameters.

      1. plumbing.optimizer_state, model by model: get_optimizer_state_dict(full_state_dict=True,
         cpu_offload=True) gathers exp_avg and exp_avg_sq to rank 0's CPU (8 N_k), and each tensor is
         cloned into the train state (8 N_k more); the gathered dict goes when the function returns,
         the clones of every model stay (merge_states takes all of them).
      2. model.full_state_dict, model by model: get_model_state_dict gathers the fp32 weights (4 N_k),
         `.clone()` copies them (4 N_k more); the clones stay until the end.
      3. plumbing.check_finite_weights: per tensor torch.isfinite (1 B per element, freed by .all())
         then tensor.abs() (4 B per element): 4 B x the largest weight tensor.
      4. huggingface_hub.save_torch_state_dict and plumbing.write_train_state write with
         safetensors.torch.save_file, which (safetensors 0.8) writes from the tensors' own memory: no
         copy (test_memory_plan checks it by the process's peak RSS).
    Without FSDP the gathered dicts are the live tensors themselves: only the clones are new.
    GPU: each DTensor's full_tensor() is all-gathered on the device (padded to W x ceil(dim0 / W)
    rows), unpadded, copied to the CPU and freed, one tensor at a time: at most the largest one,
    padded and unpadded, 4 B each. On a CPU run (host_is_device) the gathered tensor is itself the
    CPU copy, already counted."""
    N = {name: sizes[name].numel for name in trained}
    gathered = 1 if fsdp else 0                    # the gathered dict is a copy only under FSDP
    cpu, before = {}, 0
    for name in trained:                           # 1. optimizer_state
        cpu[f"{name} AdamW state gathered"] = {"AdamW moments of the models before, cloned": before,
                                               "its exp_avg, exp_avg_sq gathered": gathered * 8 * N[name],
                                               "... and cloned": 8 * N[name]}
        before += 8 * N[name]
    weights = 0
    for name in trained:                           # 2. full_state_dict
        cpu[f"{name} weights gathered"] = {"AdamW moments, cloned (train state)": before,
                                           "weights of the models before, cloned": weights,
                                           "its fp32 weights gathered": gathered * 4 * N[name],
                                           "... and cloned": 4 * N[name]}
        weights += 4 * N[name]
    largest = max(sizes[name].largest for name in trained)
    cpu["finite check"] = {"AdamW moments, cloned (train state)": before, "weights, cloned": weights,
                           "abs() of the largest weight": 4 * largest}
    widest = max(trained, key=lambda name: sizes[name].largest_padded)
    gpu = {"one tensor all-gathered": {} if host_is_device or not fsdp else {
        "largest tensor, padded": 4 * sizes[widest].largest_padded, "... unpadded": 4 * sizes[widest].largest}}
    return {"cpu": cpu, "gpu": gpu}


def adamw_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors plumbing.optimizer_state hands to the save for one trained model, as meta tensors of
    their whole shapes, in its order (torch's flattened optimizer state dict): the parameters as
    model.make_optimizer groups them (matrices, then 1-D parameters), each "state.<name>.step" (fp32
    scalar), "state.<name>.exp_avg", "state.<name>.exp_avg_sq" (fp32, the parameter's shape)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    for name, p in [(n, p) for n, p in params if p.ndim >= 2] + [(n, p) for n, p in params if p.ndim < 2]:
        out[f"state.{name}.step"] = torch.empty((), dtype=torch.float32, device="meta")
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"state.{name}.{k}"] = torch.empty(p.shape, dtype=torch.float32, device="meta")
    return out


def save_layout(model: nn.Module, world_size: int) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, int]]]:
    """What model.save_checkpoint writes for one trained model, as the code lays it out: {"weights":
    (model.sharded_state_dict, its files), "AdamW moments": (adamw_shards, their files)}: the tensors
    (whole shapes) and the file (1..N) each goes to, plumbing.file_buckets(tensors, W) as
    model.write_whole_files calls it for both."""
    weights, moments = M.sharded_state_dict(model), adamw_shards(model)
    return {"weights": (weights, plumbing.file_buckets(weights, world_size)),
            "AdamW moments": (moments, plumbing.file_buckets(moments, world_size))}


def whole_file_bytes(tensors: dict[str, torch.Tensor], files: dict[str, int], world_size: int, rank: int,
                     fsdp: bool, host_is_device: bool, label: str) -> tuple[dict, dict, list[int]]:
    """model.write_whole_files(folder, tensors, d) on rank `rank`, above the persistent state: the CPU
    and GPU bytes at the worst moment of each group of W files, and the bytes of the whole tensors of
    each file this rank writes (what it hands safetensors' save_file). Returns (cpu, gpu, files): cpu and
    gpu {moment: {term: bytes}}.

    File k belongs to rank (k - 1) % W; files first .. first + W - 1 are written together: tensor by
    tensor in file order, model.gather_whole brings each whole to its file's rank, which keeps it
    (`mine`) until every tensor of the group has been gathered, writes its file with save_file (straight
    from the tensors' memory: nothing more) and frees it. For a DTensor (FSDP2: dim 0 in chunks of
    ceil(dim0 / W) rows), every rank allocates its chunk padded to that size (`padded`); the owner
    allocates W such chunks (`parts`, dist.gather's outputs), then torch.cat(parts) (the padded whole),
    slices its rows and takes it to the CPU: on a GPU the .cpu() copy (the whole tensor) is what it keeps,
    and padded, parts and the cat (GPU) are freed as gather_whole returns; on a CPU run .cpu() is the
    cat itself (the slice a view of it), kept padded. A tensor that is not a DTensor (one process, or
    AdamW's 0-d step counts) is taken whole by the owner only: a CPU copy on a GPU run, itself on a CPU
    run. On a CPU run (gloo) dist.gather also stages the W chunks in one flat tensor on the owner while
    it runs, freed before the cat: the same bytes as the cat, so the same peak (and invisible to the
    live-tensor counter, in gloo's thread)."""
    cpu, gpu, mine_files = {}, {}, []
    n = max(files.values())
    for first in range(1, n + 1, world_size):
        own = first + rank if first + rank <= n else None     # the file this rank writes in this group
        held, written, best_cpu, best_gpu = 0, 0, {}, {}
        for key, tensor in tensors.items():
            k = files[key]
            if not first <= k < first + world_size:
                continue
            owner = (k - 1) % world_size == rank
            whole = tensor.numel() * tensor.element_size()
            if fsdp and tensor.ndim:          # a DTensor: padded chunk, gathered, concatenated
                chunk = math.ceil(tensor.shape[0] / world_size) * (whole // max(1, tensor.shape[0]))
                moving = {"this tensor's chunk, padded": chunk}
                if owner:
                    moving |= {"... its W padded chunks gathered (parts)": world_size * chunk,
                               "... concatenated (torch.cat)": world_size * chunk}
                kept = (world_size * chunk if host_is_device else whole) if owner else 0
            else:                             # taken whole by the owner: .detach().cpu()
                moving, kept = {}, (0 if host_is_device else whole) if owner else 0
            if host_is_device:                # one memory: everything is CPU bytes
                now = {f"file {own}'s whole tensors gathered before (padded)": held} | moving
            else:
                now = {f"file {own}'s whole tensors gathered before (CPU copies)": held}
                if owner:
                    now["this tensor, copied to the CPU"] = kept
                best_gpu = max(best_gpu, moving, key=lambda t: sum(t.values()))
            best_cpu = max(best_cpu, now, key=lambda t: sum(t.values()))
            held += kept
            written += whole if owner else 0
        if own is not None:
            mine_files.append(written)
        moment = (f"writing {label}, file {own} of {n} (this rank's)" if own is not None else
                  f"writing {label}, files {first}-{min(n, first + world_size - 1)} of {n} (none this rank's)")
        cpu[moment] = best_cpu
        gpu[moment] = best_gpu
    return cpu, gpu, mine_files


def sharded_save_bytes(models: dict[str, nn.Module], trained: tuple[str, ...], world_size: int, rank: int,
                       host_is_device: bool, fsdp: bool = True) -> dict:
    """The save of this version (model.save_checkpoint), on rank `rank`, above the persistent state, at
    each of its moments. Returns {"cpu": {moment: {term: bytes}}, "gpu": {...}, "files": [bytes of the
    whole tensors of each file this rank writes, in the order it writes them]}.

      1. model.check_weights: per local shard torch.linalg.vector_norm(ord=inf), one reduction pass
         that allocates nothing of the shard's size: no term.
      2. model.save_checkpoint, model by model: model.write_whole_files(folder,
         model.sharded_state_dict(m), d) (whole_file_bytes): the files plumbing.file_buckets(state dict,
         W) makes (whole tensors, at most plumbing.SHARD_FILE_BYTES each unless one tensor alone is
         larger, at least W while files stay over plumbing.MIN_FILE_BYTES), W at a time.
      3. the AdamW moments of every model (plumbing.optimizer_state: DTensor shards and the 0-d step
         counts, nothing gathered before): write_whole_files(train_state/<model>, ...), the same way.
      4. rank 0's train_state.safetensors (RNG states, lambda) and JSON: small, not counted.
    So per rank: on the CPU, the whole tensors of the one file it writes (padded, on a CPU run) plus the
    tensor being gathered; on the GPU, one tensor's padded chunk, and on its file's rank the W chunks
    and their concatenation (twice the padded whole tensor). fsdp=False (one plain process): every
    tensor is taken whole, itself on a CPU run."""
    cpu, gpu, files = {}, {}, []
    for kind in ("weights", "AdamW moments"):              # all weights first, then all moments
        for name in trained:
            tensors, buckets = save_layout(models[name], world_size)[kind]
            c, g, f = whole_file_bytes(tensors, buckets, world_size, rank, fsdp, host_is_device, f"{name} {kind}")
            cpu |= c
            gpu |= g
            files += f
    return {"cpu": cpu, "gpu": gpu if not host_is_device else {"one memory (a CPU run)": {}}, "files": files}


def sharded_save_worst(models: dict[str, nn.Module], trained: tuple[str, ...], world_size: int,
                       host_is_device: bool, fsdp: bool) -> tuple[int, int, dict]:
    """The ranks whose sharded save holds the most CPU bytes and the most GPU bytes (ranks differ in
    the files they write and in which of them gathers the largest tensors), and their moments: (CPU
    rank, GPU rank, {"cpu": CPU rank's moments, "gpu": GPU rank's})."""
    per_rank = {r: sharded_save_bytes(models, trained, world_size, r, host_is_device, fsdp) for r in range(world_size)}
    cpu_rank = max(per_rank, key=lambda r: max(sum(t.values()) for t in per_rank[r]["cpu"].values()))
    gpu_rank = max(per_rank, key=lambda r: max(sum(t.values()) for t in per_rank[r]["gpu"].values()))
    return cpu_rank, gpu_rank, {"cpu": per_rank[cpu_rank]["cpu"], "gpu": per_rank[gpu_rank]["gpu"]}


def save_plan(moments: dict[str, dict[str, dict[str, int]]], persistent_total: int, host_is_device: bool) -> dict:
    """One scheme's figures: the CPU moment with the most bytes and its terms, its CPU bytes, and the GPU
    bytes (persistent + the largest GPU moment, its terms). On a CPU run both are one memory:
    persistent + CPU."""
    moment = max(moments["cpu"], key=lambda k: sum(moments["cpu"][k].values()))
    gpu_moment = max(moments["gpu"], key=lambda k: sum(moments["gpu"][k].values()))
    cpu = sum(moments["cpu"][moment].values())
    return {"moment": moment, "terms": {k: v for k, v in moments["cpu"][moment].items() if v},
            "gpu_moment": gpu_moment, "gpu_terms": {k: v for k, v in moments["gpu"][gpu_moment].items() if v},
            "cpu": persistent_total + cpu if host_is_device else cpu,
            "gpu": persistent_total + sum(moments["gpu"][gpu_moment].values())}


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def estimate_memory(config, world_size: int, *, per_device_prompt_batch_size: int = 16,
                    per_device_train_batch_size: int = 16, max_length: int = 512, prompt_length: int = 128,
                    bf16: bool = True, gradient_checkpointing: bool = False, fsdp: bool | None = None,
                    stage: str = "ppo_lagrangian", samples_per_prompt: int = 1, save_rank: int | None = None,
                    method: str = "dpo", mocan_batch_size: int | None = None, mocan_samples: int | None = None) -> dict:
    """Per-rank bytes of PPO-Lagrangian (ppo_lagrangian.py), or of rloo_lagrangian.py with stage
    "rloo_lagrangian" (its rollout: P prompts x samples_per_prompt answers), or of dpo.py with stage "dpo"
    (per_device_train_batch_size pairs, 2B rows, per micro-batch; method "mocan" adds its offline phase of
    mocan_batch_size prompts x mocan_samples samples, defaults dpo.Args'), for a decoder config, on rank 0.

    fsdp (default: world_size > 1) is a torchrun run with FSDP2 (model.prepare_model), also with
    one rank (`torchrun --nproc_per_node 1`); fsdp=False is one plain process: whole models, nothing
    gathered. bf16 is what ppo_lagrangian.py does on GPU (frozen models
    cast to bf16; under FSDP the trained models compute in bf16 with fp32 master weights and gradient
    reduction); bf16=False is the CPU path (everything fp32). One GPU process (world_size 1 with bf16)
    computes under torch.autocast instead, whose weight-cast cache and fp32 residual stream these
    formulas do not describe: it is refused.

    Each phase lists its candidate moments as {term: bytes}; the phase's peak is persistent_total plus
    its largest moment. Returns a dict: "params" per model, "persistent" {model: {part: bytes}},
    "persistent_total", "phases" {phase: {"moment", "terms", "total"}}, "peak_phase", "peak", and
    "save" {"gathered" (the previous version's, rank 0), "sharded" (this version's, on save_rank; by
    default CPU on the rank that holds the most CPU bytes, GPU on the one that holds the most GPU
    bytes)}: {"moment", "terms", "gpu_moment", "gpu_terms", "cpu", "gpu", "rank", "gpu_rank"}, and for
    "sharded" "files" (save_rank's files, bytes of whole tensors, in the order written; None by default).
    """
    if stage not in STAGES:
        raise UserError(f"--stage {stage}: choose {', '.join(STAGES)}")
    if method not in METHODS or (method != "dpo" and stage != "dpo"):
        raise UserError(f"--method {method}: dpo.py's methods are {', '.join(METHODS)}, with --stage dpo only")
    trained, frozen, critics = STAGES[stage], FROZEN_OF[stage], STAGES[stage][1:]
    mocan = method == "mocan"
    if mocan:  # dpo.Args' defaults for what is not given
        import dpo

        mocan_batch_size = mocan_batch_size or dpo.Args.mocan_batch_size
        mocan_samples = mocan_samples or dpo.Args.mocan_samples
        eval_batch_size = dpo.Args.per_device_eval_batch_size
    K = samples_per_prompt if stage == "rloo_lagrangian" else 1
    # P: sequences per rank per rollout (prompts x answers), the batch of generation and scoring
    P, B, L, S = per_device_prompt_batch_size * K, per_device_train_batch_size, max_length, prompt_length
    if min(P, B, S, world_size) < 1 or L <= S:
        raise UserError(f"need world size and batch sizes >= 1 and max_length ({L}) > prompt_length ({S}) >= 1")
    fsdp = world_size > 1 if fsdp is None else fsdp
    if not fsdp and bf16:
        raise UserError("one GPU process without torchrun (autocast) is not modelled: give --fsdp (torchrun), "
                          "or --no-bf16 for one CPU process")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
               if getattr(config, k, None) is None]
    if missing:
        raise UserError(f"{type(config).__name__} has no {', '.join(missing)}: the activation formulas are "
                          "written for LLaMA-style decoders (RMSNorm, SwiGLU MLP)")
    models = meta_models(config, stage, scorers=stage != "dpo" or mocan)
    sizes = {name: model_size(m, world_size) for name, m in models.items()}
    h, i, V, d = config.hidden_size, config.intermediate_size, config.vocab_size, head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    # the compute dtype, and the frozen models' dtype: on GPU prepare_model casts frozen models to bf16
    # and FSDP2's MixedPrecisionPolicy all-gathers the trained ones in bf16
    c = 2 if bf16 else 4

    # ---- persistent: sharded weights, gradients, AdamW states ---------------------------------
    persistent: dict[str, dict[str, int]] = {}
    for name in trained:
        n = sizes[name].shard
        persistent[name] = {"fp32 params": 4 * n, "fp32 grads": 4 * n, "AdamW states": 8 * n}
    for name in frozen:
        persistent[name] = {f"{'bf16' if bf16 else 'fp32'} params": c * sizes[name].shard}
    if fsdp:  # FSDP2 never reshards a root after a forward without backward
        persistent["frozen roots, left gathered"] = {
            "params": sum(c * world_size * sizes[n].root_shard for n in frozen)}
    persistent_total = sum(sum(parts.values()) for parts in persistent.values())

    def unsharded(name: str, part: str) -> int:
        """An FSDP2 unit all-gathered, padding included (0 without FSDP): "all", "root", "layer", or
        "head" (the size of the root's gradients)."""
        shard = {"all": sizes[name].shard, "root": sizes[name].root_shard, "layer": sizes[name].layer_shard,
                 "head": sizes[name].head_shard}[part]
        return c * world_size * shard if fsdp else 0

    # ---- rollout: the whole actor unsharded, the KV cache --------------------------------------
    def generation(weights: dict[str, int], P: int) -> dict[str, dict[str, int]]:
        """model.sample of P sequences from S to L tokens under gathered_weights (`weights`: the model unsharded)."""
        # Each decoding step grows a layer's cache by torch.cat (old and new keys exist at once); with
        # grouped-query attention and a mask, repeat_kv also copies that layer's keys and values to a heads.
        growth = P * L * d * c * (2 * config.num_attention_heads if kv_heads < config.num_attention_heads else kv_heads)
        return {
            "prefill": weights | {"KV cache, prompt": kv_cache_bytes(config, P, S, c),
                                  "prefill logits or layer work": P * S * c * max(V, 2 * h + 3 * i)},
            "end of generation": weights | {"KV cache": kv_cache_bytes(config, P, L, c), "cache growth, one layer": growth,
                                            "last step's logits, fp32 copy, probs": P * V * (c + 8)},
        }

    rollout = generation({"actor unsharded (gathered_weights)": unsharded("actor", "all")} if fsdp else {}, P) \
        if stage != "dpo" else {}

    # ---- scoring: no-grad forwards over the whole rollout batch, one model at a time -----------
    # The actor's root reshards after every forward (gathered_weights sets reshard_after_forward=True on
    # exit) and the reference's is already counted, so log-probs add only the logits chain; each critic's
    # root stays gathered from its scoring forward until its backward.
    scoring = {"actor or reference log-probs": {"logits chain": logits_chain_bytes(config, P, L, c)}}
    if critics:
        scoring["critic values"] = {"both critics' roots": 2 * unsharded("reward_critic", "root"),
                                    "two layers unsharded (current, prefetched)": 2 * unsharded("reward_critic", "layer"),
                                    "layer work": no_grad_layer_bytes(config, P * L, c)}

    # ---- updates: forward end, backward start, backward of the last layer -----------------------
    def update(name: str, kept_roots: dict[str, int], logits: int, batch: int = B) -> dict[str, dict[str, int]]:
        """A trained model's forward and backward over batch x L tokens. Its root stays gathered from the
        forward to the backward (FSDP2's default for a root), except the actor's: gathered_weights set
        reshard_after_forward on it."""
        saved = saved_activations(config, batch, L, c, gradient_checkpointing)
        if name != "actor":
            kept_roots = kept_roots | {f"{name} root unsharded": unsharded(name, "root")}
        freed = {"previous grads, freed by zero_grad": -persistent[name]["fp32 grads"]}
        # in the backward the root is gathered (kept since the forward, or the actor's re-gathered) and the
        # head's gradients are unsharded until the end; one layer: its params, the prefetched next one's,
        # its unsharded gradients
        last_layer = {f"{name} root unsharded": unsharded(name, "root"),
                      f"{name} head grads unsharded": unsharded(name, "head") if fsdp else 4 * sizes[name].head_shard,
                      "layer params x2 + grads, unsharded": 3 * unsharded(name, "layer"),
                      "saved activations (layers)": saved["decoder layers"],
                      "layer backward gradients": layer_backward_bytes(config, batch * L, c)}
        if gradient_checkpointing:
            last_layer["recomputed layer activations"] = layer_activation_bytes(config, batch, L, c)
        forward_end = {"saved activations": sum(saved.values())}
        moments = {"forward end": kept_roots | forward_end | {"logits chain": logits},
                   "backward, last layer": kept_roots | freed | last_layer}
        if logits:
            moments["backward start"] = kept_roots | freed | {"saved activations": sum(saved.values()),
                                                              "logits backward": logits}
        return moments

    critic_roots = {"both critics' roots (kept since scoring)": 2 * unsharded("reward_critic", "root")} if critics else {}
    if stage != "dpo":
        phase_moments = {
            "rollout": rollout,
            "scoring": scoring,
            "actor update": update("actor", critic_roots, logits_chain_bytes(config, B, L, c)),
        }
    else:
        phase_moments = {}
        if mocan:  # dpo.mocan_offline, inside start_training: after prepare_model, before make_optimizer
            pm = mocan_batch_size * mocan_samples   # sequences per sampling batch
            setup = {"policy grads, AdamW states (not yet allocated)": -persistent["policy"]["fp32 grads"]
                                                                        - persistent["policy"]["AdamW states"],
                     "reward, cost models' shards (freed after this phase)":
                         c * (sizes["reward_model"].shard + sizes["cost_model"].shard),
                     # left gathered by their first no-grad forward: while the next batch samples too
                     "reward, cost models' roots": unsharded("reward_model", "root") + unsharded("cost_model", "root")}
            # gathered_weights gathers the whole reference (its root included, counted as persistent) and
            # reshards everything on exit
            after = {"reference root (resharded by gathered_weights)": -unsharded("reference", "root"),
                     "two layers unsharded (current, prefetched)": 2 * unsharded("reward_model", "layer")}
            offline = {f"sampling, {k}": setup | t for k, t in generation(
                {"reference unsharded (gathered_weights), beyond its root":
                 unsharded("reference", "all") - unsharded("reference", "root")}, pm).items()}
            offline["scoring the samples"] = setup | after | {"layer work": no_grad_layer_bytes(config, pm * L, c)}
            offline["scoring the pairs"] = setup | after | {"layer work": no_grad_layer_bytes(config, 2 * eval_batch_size * L, c)}
            phase_moments["offline (mocan)"] = offline
        # one micro-batch of B pairs = 2B right-padded rows: the reference's no-grad forward first (its
        # logits chain freed before the policy's graph exists), then the policy's forward (its root, never
        # under gathered_weights, stays gathered until its backward) and backward
        update_moments = update("policy", {}, logits_chain_bytes(config, 2 * B, L, c), batch=2 * B)
        update_moments["reference forward (before the policy's)"] = {
            "layer work": no_grad_layer_bytes(config, 2 * B * L, c),
            "reference logits chain (no grad)": logits_chain_bytes(config, 2 * B, L, c)}
        phase_moments["update"] = update_moments
    if critics:  # the reward critic trains first, while the cost critic's root is still gathered from scoring
        phase_moments["critic update"] = update("reward_critic", {"cost critic root (kept since scoring)":
                                                                  unsharded("cost_critic", "root")}, 0)
    phases = {}
    for phase, moments in phase_moments.items():
        moment = max(moments, key=lambda k: sum(moments[k].values()))
        terms = {k: v for k, v in moments[moment].items() if v}
        phases[phase] = {"moment": moment, "terms": terms, "total": persistent_total + sum(terms.values()),
                         "moments": {k: persistent_total + sum(t.values()) for k, t in moments.items()}}
    peak_phase = max(phases, key=lambda k: phases[k]["total"])
    # ---- the save: CPU and GPU bytes per rank, the previous version's gathered scheme and this one's sharded -----------------
    host_is_device = not bf16  # the CPU path: one memory holds the "GPU" state and the CPU copies
    save = {"gathered": save_plan(gathered_save_bytes(sizes, trained, fsdp, host_is_device), persistent_total,
                                  host_is_device),
            "sharded": None}
    if save_rank is None:   # the plan: the ranks that hold the most, CPU and GPU
        save_rank, gpu_rank, moments = sharded_save_worst(models, trained, world_size, host_is_device, fsdp)
        files = None
    else:                   # a measurement: the rank measured
        moments = sharded_save_bytes(models, trained, world_size, save_rank, host_is_device, fsdp)
        gpu_rank, files = save_rank, moments["files"]
    save["sharded"] = save_plan(moments, persistent_total, host_is_device) | {"rank": save_rank, "gpu_rank": gpu_rank,
                                                                            "files": files}
    save["gathered"] |= {"rank": 0, "gpu_rank": 0}
    return {"params": {name: s.numel for name, s in sizes.items()}, "world_size": world_size, "fsdp": fsdp, "bf16": bf16,
            "gradient_checkpointing": gradient_checkpointing, "stage": stage,
            "sizes": {"per_device_prompt_batch_size": per_device_prompt_batch_size, "samples_per_prompt": K,
                      "per_device_train_batch_size": B, "max_length": L, "prompt_length": S} if stage != "dpo" else
                     {"method": method, "per_device_train_batch_size": B, "max_length": L}
                     | ({"mocan_batch_size": mocan_batch_size, "mocan_samples": mocan_samples, "prompt_length": S,
                         "per_device_eval_batch_size": eval_batch_size} if mocan else {}),
            "persistent": persistent, "persistent_total": persistent_total,
            "phases": phases, "peak_phase": peak_phase, "peak": phases[peak_phase]["total"], "save": save}


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _row(label: str, nbytes: int, indent: int = 2, width: int = 72) -> str:
    return f"{' ' * indent}{label:<{width - indent}}{nbytes / GiB:>8.2f}"


def format_plan(plan: dict, model_name: str, gpu_memory_gib: float) -> str:
    """The per-rank table: persistent parts, each phase's peak with its transients, the verdict."""
    W, s, n = plan["world_size"], plan["sizes"], plan["params"]
    title = {"ppo_lagrangian": "PPO-Lagrangian (six models)", "rloo_lagrangian": "RLOO-Lagrangian (four models)",
             "dpo": f"dpo.py --method {s.get('method')} (policy and reference"
                    + (", reward and cost models offline)" if "reward_model" in n else ")")}
    if plan["stage"] == "dpo":
        batch = (f"B={s['per_device_train_batch_size']} pairs (2B rows) per micro-batch, L={s['max_length']}"
                 + (f"; offline: {s['mocan_batch_size']} prompts x {s['mocan_samples']} samples, S={s['prompt_length']}, "
                    f"{s['per_device_eval_batch_size']} pairs per scoring batch" if "mocan_samples" in s else ""))
    else:
        batch = (f"P={s['per_device_prompt_batch_size']} prompts" + (f" x K={s['samples_per_prompt']} answers"
                                                                     if s["samples_per_prompt"] > 1 else "")
                 + f", B={s['per_device_train_batch_size']} per micro-batch, L={s['max_length']}, S={s['prompt_length']}")
    trained = STAGES[plan["stage"]][0]
    lines = [f"{title[plan['stage']]}, memory per rank: {model_name} ({trained} {n[trained] / 1e9:.2f}B"
             + (f", each score model {n['reward_model'] / 1e9:.2f}B" if "reward_model" in n else "") + " parameters)",
             f"{f'FSDP2 over {W} rank' + ('s' if W > 1 else '') if plan['fsdp'] else 'one process, no FSDP'}, "
             f"{'bf16 (fp32 master weights, grads, AdamW)' if plan['bf16'] else 'fp32'}, gradient checkpointing "
             f"{'on' if plan['gradient_checkpointing'] else 'off'}; {batch}",
             "", f"{'persistent':<72}{'GiB':>8}"]
    for name, parts in plan["persistent"].items():
        detail = ", ".join(f"{part} {b / GiB:.2f}" for part, b in parts.items()) if len(parts) > 1 else next(iter(parts))
        lines.append(_row(f"{name}: {detail}", sum(parts.values())))
    lines += [_row("total", plan["persistent_total"]), "", f"{'phase peak = persistent + transients':<72}{'GiB':>8}"]
    for phase, p in plan["phases"].items():
        lines.append(_row(f"{phase} ({p['moment']})", p["total"]))
        lines += [_row(name, b, indent=6) for name, b in p["terms"].items()]
    who = {"gathered": "before (the gathered save of b9c3857)", "sharded": "now (sharded), the fullest rank:"}
    lines += ["", f"{'save (CPU: the largest moment; GPU: persistent + transients)':<64}{'CPU GiB':>8}{'GPU GiB':>8}"]
    for scheme, p in plan["save"].items():
        lines.append(_row(f"{who[scheme]} rank {p['rank']}", p["cpu"], indent=2, width=64) + f"{p['gpu'] / GiB:>8.2f}")
        lines.append(f"    CPU at: {p['moment']}")
        lines += [_row(name, b, indent=6, width=64) for name, b in p["terms"].items()]
        if p["gpu_terms"]:
            lines.append(f"    GPU at: {p['gpu_moment']}" + (f", rank {p['gpu_rank']}" if p["gpu_rank"] != p["rank"] else ""))
            lines += [_row(name, b, indent=6, width=72) for name, b in p["gpu_terms"].items()]
    fits = plan["peak"] <= gpu_memory_gib * GiB
    lines += ["", f"peak: {plan['peak_phase']}, {plan['peak'] / GiB:.2f} GiB of {gpu_memory_gib:g} GiB per GPU: "
                  f"{'fits' if fits else 'does NOT fit'} (not counting the CUDA context and allocator fragmentation)"]
    return "\n".join(lines)


def plan_record(plan: dict, model_name: str, gpu_memory_gib: float) -> dict:
    """The figures as one flat JSON-able record (GiB), for bench.py and logs."""
    return {"model": model_name, "stage": plan["stage"], "world_size": plan["world_size"], "bf16": plan["bf16"],
            "gradient_checkpointing": plan["gradient_checkpointing"], **plan["sizes"],
            "params": plan["params"], "persistent_gib": round(plan["persistent_total"] / GiB, 3),
            "phases_gib": {k: round(p["total"] / GiB, 3) for k, p in plan["phases"].items()},
            "peak_phase": plan["peak_phase"], "peak_gib": round(plan["peak"] / GiB, 3),
            "save_gib": {scheme: {"cpu": round(p["cpu"] / GiB, 3), "gpu": round(p["gpu"] / GiB, 3), "moment": p["moment"], "rank": p["rank"],
                                  "gpu_rank": p["gpu_rank"]}
                         for scheme, p in plan["save"].items()},
            "gpu_memory_gib": gpu_memory_gib, "fits": plan["peak"] <= gpu_memory_gib * GiB}


# --------------------------------------------------------------------------------------------
# Measurement: live tensor bytes during a real ppo_lagrangian.py run
# --------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages and their peak per phase, counted at every aten op.

    Each storage an op reads or returns is counted once (views share it) and released by a weakref
    finalizer when freed. FSDP2 frees and re-allocates unsharded parameters with UntypedStorage.resize_,
    which bypasses the dispatcher, so resize_ is wrapped while the mode is active. DTensor ops are let
    through (NotImplemented) so that their local-tensor ops are the ones counted. This is the method of
    torch.distributed._tools.mem_tracker.MemTracker without its per-module bookkeeping. Not seen:
    kernels' internal scratch buffers, and tensors made outside the dispatcher until an op uses them.
    """

    def __init__(self):
        super().__init__()
        self.storage_bytes: dict[int, int] = {}   # id(storage) -> bytes counted for it
        self.live = 0
        self.phase = "setup"
        self.peaks: dict[str, int] = {}

    def _peak(self, nbytes: int) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), nbytes)

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        if key not in self.storage_bytes:
            self.storage_bytes[key] = 0
            weakref.finalize(storage, self._release, key)
        self.live += size - self.storage_bytes[key]
        self.storage_bytes[key] = size
        self._peak(self.live)

    def _release(self, key: int) -> None:
        self.live -= self.storage_bytes.pop(key)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((out, args, kwargs)):  # inputs too: a frozen embedding is never an output
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._count(t.untyped_storage())
        return out

    def __enter__(self):
        resize, tracker = torch.UntypedStorage.resize_, self

        def tracked_resize(storage, size):
            resize(storage, size)
            tracker._count(storage)

        self._resize = resize
        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


# The measured run: a small LLaMA (hidden 256, 4 layers, vocabulary 2048: the toy tokenizer plus
# filler tokens), two rollouts of ppo_lagrangian.py with these sizes.
MEASURE_CONFIG = dict(preset="toy-small", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, vocab_size=2048)
MEASURE_RUN = dict(per_device_prompt_batch_size=16, per_device_train_batch_size=16, max_length=128)


def measure_config():
    return M.preset_config(**MEASURE_CONFIG)


def _small_checkpoints(folder: Path) -> Path:
    """Random-init SFT, reward and cost checkpoints of MEASURE_CONFIG under folder (the stages' output
    format), with the toy tokenizer grown to its vocabulary. Returns the toy data folder."""
    import toyworld
    from transformers import AutoModelForCausalLM

    data = toyworld.ensure_toy_data(ROOT / "data" / "toy")
    tokenizer = M.load_tokenizer(data / "tokenizer", "left")
    tokenizer.add_tokens([f"<filler{i}>" for i in range(MEASURE_CONFIG["vocab_size"] - len(tokenizer))])
    one = M.Dist(0, 0, 1, torch.device("cpu"))
    M.seed_everything(0)
    M.save_checkpoint(folder / "sft", one, tokenizer, {"": AutoModelForCausalLM.from_config(measure_config())})
    for kind in ("reward", "cost"):
        model = M.load_score_model(str(folder / "sft"), tokenizer, kind)
        M.save_checkpoint(folder / kind, one, tokenizer, {"": model})
    return data


def measure_memory(*, per_device_prompt_batch_size: int = MEASURE_RUN["per_device_prompt_batch_size"],
                   per_device_train_batch_size: int = MEASURE_RUN["per_device_train_batch_size"],
                   max_length: int = MEASURE_RUN["max_length"], gradient_checkpointing: bool = False,
                   stage: str = "ppo_lagrangian", samples_per_prompt: int = 4) -> dict:
    """Run ppo_lagrangian.main (or rloo_lagrangian.main, whose prompt batch is then
    per_device_prompt_batch_size / samples_per_prompt prompts: the same sequences per rollout) for two
    rollouts of MEASURE_CONFIG on CPU (fp32) under LiveTensorBytes and return this rank's measured peak
    per phase next to estimate_memory's for the same sizes.

    Phases are marked where ppo_lagrangian.py enters them: model.sample (rollout), a no-grad forward of
    a score model or of model.policy_logprobs (scoring), policy_logprobs with grad (actor update), a
    score model with grad (critic update), optimizer_state or save_checkpoint (saving: compared with
    the estimate of the scheme the run used, "sharded" if it called model.write_whole_files, else
    "gathered", as its CPU bytes on a CPU run; the files this rank hands safetensors' save_file are
    recorded, bytes of whole tensors each, to compare with the estimate's files). The save's Python
    allocations are traced apart (tracemalloc, from the save's start: result["save"]["python_peak"]):
    save_file writes straight from the tensors' memory, so they are small objects only (keys, headers,
    the JSON train state, pickled check_weights reports), not counted in the estimate nor added here.
    "persistent" is the live bytes when the second rollout starts (gradients and AdamW states exist by
    then). Under torchrun (gloo, FSDP2) every rank runs this; rank 0's figures are reported.
    """
    import importlib
    import tracemalloc

    import safetensors.torch as safetensors_torch

    if stage not in MEASURED:
        raise UserError(f"--measure runs {' or '.join(MEASURED)} only, not --stage {stage}")
    module = importlib.import_module(stage)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    K = samples_per_prompt if stage == "rloo_lagrangian" else 1
    if per_device_prompt_batch_size % K:
        raise UserError(f"--measure: {per_device_prompt_batch_size} sequences per rollout are not whole groups of {K}")
    P, B = per_device_prompt_batch_size // K, per_device_train_batch_size   # P: prompts per rank per rollout
    tracker = LiveTensorBytes()
    seen = {"rollouts": 0, "prompt_length": 0, "persistent": 0}

    def marked(fn, phase_of):
        def wrapper(*args, **kwargs):
            tracker.set_phase(phase_of(*args, **kwargs))
            return fn(*args, **kwargs)
        return wrapper

    def rollout_phase(model, input_ids, *args, **kwargs):
        seen["rollouts"] += 1
        seen["prompt_length"] = input_ids.shape[1]
        seen["persistent"] = tracker.live
        return "rollout"

    def saving(*args, **kwargs):
        if not tracemalloc.is_tracing():   # the save's Python allocations, apart from the tensors
            tracemalloc.start()
            seen["python_from"] = tracemalloc.get_traced_memory()[0]
        return "saving"

    def whole_files(fn):
        """model.write_whole_files: the sharded save of this version, weights and AdamW moments."""
        def wrapper(*args, **kwargs):
            seen["whole_files"] += 1
            return fn(*args, **kwargs)
        return wrapper

    def written(fn):
        """safetensors.torch.save_file (what write_whole_files calls, imported at each call): the bytes of
        the whole tensors of each file this rank writes."""
        def wrapper(tensors, *args, **kwargs):
            seen["files"].append(sum(t.nbytes for t in tensors.values()))
            return fn(tensors, *args, **kwargs)
        return wrapper

    seen["files"], seen["whole_files"] = [], 0
    originals = {"sample": M.sample, "policy_logprobs": M.policy_logprobs, "optimizer_state": plumbing.optimizer_state,
                 "save_checkpoint": M.save_checkpoint, "write_whole_files": M.write_whole_files}
    score_forward = M.ScoreModel.forward
    st_save_file = safetensors_torch.save_file
    with tempfile.TemporaryDirectory() as tmp:
        data = _small_checkpoints(Path(tmp))
        group = {"samples_per_prompt": K} if K > 1 else {}
        args = module.Args(actor_model_name_or_path=f"{tmp}/sft", reward_model_name_or_path=f"{tmp}/reward",
                        cost_model_name_or_path=f"{tmp}/cost", dataset=str(data / "prompts"),
                        limit=2 * P * world_size, epochs=1, max_length=max_length,
                        per_device_prompt_batch_size=P, per_device_train_batch_size=B,
                        gradient_checkpointing=gradient_checkpointing, output_dir=f"{tmp}/run", save_every=0,
                        sample_every=0, log_every=1000, device="cpu", threshold=0.0, **group)
        M.sample = marked(M.sample, rollout_phase)
        M.policy_logprobs = marked(M.policy_logprobs,
                                   lambda *a, **k: "actor update" if torch.is_grad_enabled() else "scoring")
        M.ScoreModel.forward = marked(score_forward,
                                      lambda *a, **k: "critic update" if torch.is_grad_enabled() else "scoring")
        plumbing.optimizer_state = marked(plumbing.optimizer_state, saving)  # save() starts with these
        M.save_checkpoint = marked(M.save_checkpoint, saving)
        M.write_whole_files = whole_files(M.write_whole_files)
        safetensors_torch.save_file = written(st_save_file)
        try:
            with tracker:
                module.main(args)
            python_peak = tracemalloc.get_traced_memory()[1] - seen.get("python_from", 0) if tracemalloc.is_tracing() else 0
        finally:
            if tracemalloc.is_tracing():
                tracemalloc.stop()
            for name, fn in originals.items():
                setattr(M, name, fn)
            M.ScoreModel.forward = score_forward
            safetensors_torch.save_file = st_save_file
    if seen["rollouts"] != 2:
        raise UserError(f"--measure needs two rollouts and ran {seen['rollouts']}: the toy set has 64 prompts, "
                          f"fewer than 2 x {P} prompts x {world_size} ranks")
    plan = estimate_memory(measure_config(), world_size, per_device_prompt_batch_size=P, per_device_train_batch_size=B,
                           max_length=max_length, prompt_length=seen["prompt_length"], bf16=False,
                           gradient_checkpointing=gradient_checkpointing, fsdp="RANK" in os.environ,
                           stage=stage, samples_per_prompt=K, save_rank=int(os.environ.get("RANK", "0")))
    # the scheme the run used: this version's save writes with model.write_whole_files, b9c3857's had none
    phases, scheme = list(plan["phases"]), "sharded" if seen["whole_files"] else "gathered"
    measured = {"persistent": seen["persistent"], **{k: tracker.peaks[k] for k in phases},
                "saving": tracker.peaks["saving"]}
    measured["peak"] = max(measured[k] for k in phases)
    estimated = {"persistent": plan["persistent_total"], **{k: plan["phases"][k]["total"] for k in phases},
                 "saving": plan["save"][scheme]["cpu"], "peak": plan["peak"]}
    return {"world_size": world_size, "rank": int(os.environ.get("RANK", "0")), "config": MEASURE_CONFIG,
            "run": {"stage": stage, "per_device_prompt_batch_size": P, "samples_per_prompt": K,
                    "per_device_train_batch_size": B, "max_length": max_length,
                    "gradient_checkpointing": gradient_checkpointing}, "prompt_length": seen["prompt_length"],
            "measured": measured, "estimated": estimated, "estimated_peak_phase": plan["peak_phase"],
            "measured_peak_phase": max(phases, key=lambda k: measured[k]),
            "save": {"scheme": scheme, "moment": plan["save"][scheme]["moment"], "terms": plan["save"][scheme]["terms"],
                     "files": seen["files"], "estimated_files": plan["save"][scheme].get("files"),
                     "python_peak": python_peak}, "setup": tracker.peaks.get("setup", 0)}


def format_measurement(result: dict) -> str:
    """Measured vs estimated per phase, in total and above the persistent bytes (the transients)."""
    W, m, e = result["world_size"], result["measured"], result["estimated"]
    lines = [f"measured (live tensor bytes, rank {result['rank']} of {W}, "
             f"{'FSDP2 over gloo' if W > 1 else 'one process'}, fp32 on CPU) vs estimated, MiB; "
             f"prompt length {result['prompt_length']}",
             f"{'':<16}{'measured':>10}{'estimated':>11}{'est/meas':>10}{'transient meas':>16}{'est':>8}{'est/meas':>10}"]
    for k in m:
        line = f"{k:<16}{m[k] / MiB:>10.1f}{e[k] / MiB:>11.1f}{e[k] / m[k]:>10.3f}"
        if k != "persistent":
            tm, te = m[k] - m["persistent"], e[k] - e["persistent"]
            line += f"{tm / MiB:>16.1f}{te / MiB:>8.1f}{te / tm:>10.3f}"
        lines.append(line)
    lines.append(f"peak phase: measured {result['measured_peak_phase']}, estimated {result['estimated_peak_phase']}; "
                 f"saving: the {result['save']['scheme']} save (estimated at: {result['save']['moment']}), "
                 f"{len(result['save']['files'])} files written by save_file on this rank"
                 + (f", the largest {max(result['save']['files']) / MiB:.1f} MiB" if result['save']['files'] else "")
                 + f" (estimated: {len(result['save']['estimated_files'] or [])}"
                 + (f", the largest {max(result['save']['estimated_files']) / MiB:.1f} MiB" if result['save']['estimated_files'] else "")
                 + f"); the save's Python allocations (tracemalloc, not counted): {result['save']['python_peak'] / MiB:.2f} MiB at most")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """CLI: print the per-rank table and one JSON line; returns the JSON record (bench.py can call this)."""
    args = plumbing.parse_args(Args, argv, description=__doc__.splitlines()[0])
    if args.method != "dpo" and args.stage != "dpo":
        raise UserError(f"--method {args.method}: for --stage dpo only")
    if args.measure:
        result = measure_memory(gradient_checkpointing=args.gradient_checkpointing, stage=args.stage,
                                samples_per_prompt=args.samples_per_prompt)
        if result["rank"] == 0:
            print(format_measurement(result))
            print(json.dumps(result, sort_keys=True))
        return result
    if args.per_device_prompt_batch_size is None:  # the stage's paper recipe: 16 sequences per rank per rollout
        args.per_device_prompt_batch_size = 4 if args.stage == "rloo_lagrangian" else 16
    plan = estimate_memory(load_config(args.model), args.world_size, stage=args.stage,
                           samples_per_prompt=args.samples_per_prompt,
                           per_device_prompt_batch_size=args.per_device_prompt_batch_size,
                           per_device_train_batch_size=args.per_device_train_batch_size,
                           max_length=args.max_length, prompt_length=args.prompt_length, bf16=args.bf16,
                           gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, method=args.method,
                           mocan_batch_size=args.mocan_batch_size, mocan_samples=args.mocan_samples)
    record = plan_record(plan, args.model, args.gpu_memory_gib)
    print(format_plan(plan, args.model, args.gpu_memory_gib))
    print(json.dumps(record, sort_keys=True))
    return record


if __name__ == "__main__":
    plumbing.run_main(main)
    M.teardown_distributed()  # --measure under torchrun
