"""memory_plan.py: parameter counts, sharded bytes and activations against real modules and runs."""

import json
from pathlib import Path

import pytest
import torch

from tools import memory_plan as MP
import model as M
from plumbing import UserError
from conftest import torchrun

MiB = 1 << 20
SIZES = dict(per_device_prompt_batch_size=4, per_device_train_batch_size=4, max_length=32, prompt_length=8)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return M.load_tokenizer(tokenizer_dir, "left")


# ---- parameter counts: meta skeletons against modules built by model.py's loaders -------------


@pytest.mark.parametrize("preset", ["toy-tiny", "toy-small"])
def test_parameter_counts_equal_real_models(tok, preset):
    plan = MP.estimate_memory(M.preset_config(preset, vocab_size=len(tok)), 1, bf16=False, **SIZES)
    real = {"actor": M.load_causal_lm(preset, tok), "reference": M.load_causal_lm(preset, tok),
            "reward_model": M.load_score_model(preset, tok, "reward"),
            "cost_model": M.load_score_model(preset, tok, "cost"),
            "reward_critic": M.load_score_model(preset, tok, "critic"),
            "cost_critic": M.load_score_model(preset, tok, "critic")}
    assert plan["params"] == {name: sum(p.numel() for p in m.parameters()) for name, m in real.items()}
    # one process: the persistent bytes are the whole models, fp32 on CPU
    assert plan["persistent"]["actor"]["fp32 params"] == 4 * sum(p.numel() for p in real["actor"].parameters())


# ---- activations: the per-layer formula against what autograd saves ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_equal_what_autograd_saves(dtype):
    """Every storage the forward of a causal LM saves for backward (saved_tensors_hooks), minus the
    weights and the input ids, against saved_activations' formula; bf16 is the GPU compute dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = M.preset_config("toy-tiny", vocab_size=50)
    lm = AutoModelForCausalLM.from_config(config).to(dtype)
    B, L = 3, 40
    ids = torch.randint(0, 50, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :5] = 0                                      # left padding: SDPA gets a mask, as in PPO
    skip = {p.untyped_storage().data_ptr() for p in lm.parameters()} | {ids.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(input_ids=ids, attention_mask=mask, position_ids=M.position_ids_from_mask(mask), use_cache=False)
    c = torch.finfo(dtype).bits // 8
    assert sum(saved.values()) == sum(MP.saved_activations(config, B, L, c, gradient_checkpointing=False).values())


# ---- persistent bytes: the estimate against a real 2-rank FSDP2 run ---------------------------


def test_persistent_bytes_equal_local_shards_of_two_rank_fsdp2(tmp_path, tokenizer_dir):
    p = torchrun(2, ["tests/memory_worker.py", tmp_path, tokenizer_dir], timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    measured = json.loads((tmp_path / "rank0.json").read_text())
    config = M.preset_config("toy-tiny", vocab_size=measured["vocab_size"])
    assert measured["vocab_size"] % 2 == 1            # odd vocabulary: FSDP2 pads the embedding's dim 0
    plan = MP.estimate_memory(config, 2, bf16=False, **SIZES)
    assert measured["persistent"] == plan["persistent"]


# ---- the save: the estimate's counts against real state dicts and safetensors -----------------


def _trained_toy(tok):
    """toy-tiny's three trained models after one AdamW step each (their moments exist)."""
    import plumbing

    torch.manual_seed(0)
    trained = {"actor": M.load_causal_lm("toy-tiny", tok),
               "reward_critic": M.load_score_model("toy-tiny", tok, "critic"),
               "cost_critic": M.load_score_model("toy-tiny", tok, "critic")}
    ids = torch.randint(4, len(tok), (2, 6))
    for name, model in trained.items():
        optimizer = plumbing.make_optimizer(model, lr=1e-3, weight_decay=0.0)
        out = model(input_ids=ids).logits if name == "actor" else model(ids, torch.ones_like(ids)).scores
        out.float().sum().backward()
        optimizer.step()
        trained[name] = (model, optimizer)
    return trained


def test_gathered_save_counts_the_states_of_real_models(tok):
    """The previous version's save (b9c3857, gone from the code: only its estimate is kept, as the
    "before") cloned every trained model's AdamW moments and fp32 weights whole: its terms equal those
    tensors' bytes, counted on real trained models (the optimiser's exp_avg, exp_avg_sq; the state
    dict's tensors, one per storage) and abs() of the largest weight."""
    trained = _trained_toy(tok)
    moments = sum(v.nbytes for _, o in trained.values() for st in o.state.values()
                  for k, v in st.items() if k != "step")
    weights = {t.untyped_storage().data_ptr(): t for m, _ in trained.values() for t in m.state_dict().values()}
    check = MP.gathered_save_bytes({n: MP.model_size(m, 1) for n, m in MP.meta_models(
        M.preset_config("toy-tiny", vocab_size=len(tok))).items()}, MP.TRAINED, fsdp=False, host_is_device=True)
    terms = check["cpu"]["finite check"]
    assert terms["AdamW moments, cloned (train state)"] == moments
    assert terms["weights, cloned"] == sum(t.nbytes for t in weights.values())
    assert terms["abs() of the largest weight"] == max(t.abs().nbytes for t in weights.values())


def test_sharded_save_files_are_what_save_file_writes(tok, tmp_path, monkeypatch):
    """A real save in one process (model.save_checkpoint with every trained model and its AdamW
    moments, plumbing.file_buckets' bound cut to 128 KiB so that each is several files): the bytes of
    the whole tensors safetensors' save_file is handed (model.write_whole_files), file by file, equal
    the estimate's files in the order they are written; on a GPU run (host_is_device=False) the CPU
    moment is the largest file, its tensors copied to the CPU; the moments' keys and shapes equal
    plumbing.optimizer_state's."""
    import plumbing
    import safetensors.torch as st

    monkeypatch.setattr(plumbing.file_buckets, "__defaults__", (128 << 10,))   # max_bytes = SHARD_FILE_BYTES
    trained = _trained_toy(tok)
    state = plumbing.merge_states(*[plumbing.optimizer_state(m, o, name) for name, (m, o) in trained.items()])
    files, save_file = [], st.save_file
    monkeypatch.setattr(st, "save_file", lambda tensors, *a, **kw: files.append(sum(t.nbytes for t in tensors.values()))
                        or save_file(tensors, *a, **kw))
    one = M.Dist(0, 0, 1, torch.device("cpu"))
    M.save_checkpoint(tmp_path / "ckpt", one, tok, {"": trained["actor"][0], "reward_critic": trained["reward_critic"][0],
                                                    "cost_critic": trained["cost_critic"][0]}, state)
    config = M.preset_config("toy-tiny", vocab_size=len(tok))
    models = MP.meta_models(config)
    on_cpu = MP.sharded_save_bytes(models, MP.TRAINED, 1, 0, host_is_device=True, fsdp=False)
    assert len(files) > 6 and files == on_cpu["files"]
    assert all(not sum(t.values()) for t in on_cpu["cpu"].values())   # one CPU process: the tensors themselves
    on_gpu = MP.sharded_save_bytes(models, MP.TRAINED, 1, 0, host_is_device=False, fsdp=False)
    assert on_gpu["files"] == files and max(sum(t.values()) for t in on_gpu["cpu"].values()) == max(files)
    for name, (m, o) in trained.items():
        real = state["shards"][name]
        meta = MP.adamw_shards(models[name])
        assert list(real) == list(meta) and all(real[k].shape == meta[k].shape for k in real)


def test_sharded_save_files_go_to_their_ranks():
    """Over W ranks every file of whole tensors is written once, file k by rank (k - 1) % W, and the
    ranks' files add up to the weights and AdamW moments of every trained model; at 7B x 8 no file
    exceeds plumbing.SHARD_FILE_BYTES and every rank's CPU bytes are at most its largest file."""
    import plumbing

    for preset, world in (("toy-small", 3), ("llama-7b", 8)):
        models = MP.meta_models(M.preset_config(preset))
        layouts = {name: MP.save_layout(models[name], world) for name in MP.TRAINED}
        total = sum(t.numel() * t.element_size() for layout in layouts.values() for tensors, _ in layout.values()
                    for t in tensors.values())
        expected = {r: [] for r in range(world)}
        for kind in ("weights", "AdamW moments"):
            for name in MP.TRAINED:
                tensors, files = layouts[name][kind]
                for k in range(1, max(files.values()) + 1):
                    expected[(k - 1) % world].append(sum(t.numel() * t.element_size()
                                                         for key, t in tensors.items() if files[key] == k))
        per_rank = {r: MP.sharded_save_bytes(models, MP.TRAINED, world, r, host_is_device=False) for r in range(world)}
        assert {r: p["files"] for r, p in per_rank.items()} == expected
        assert sum(sum(p["files"]) for p in per_rank.values()) == total
        if preset == "llama-7b":
            assert max(max(p["files"]) for p in per_rank.values()) <= plumbing.SHARD_FILE_BYTES
            assert all(max(sum(t.values()) for t in p["cpu"].values()) == max(p["files"]) for p in per_rank.values())


def test_safetensors_save_file_makes_no_copy(tmp_path):
    """What the save's formulas assume of safetensors: save_file() writes from the tensors' memory,
    with no copy of the file's bytes. Measured by the process's peak resident memory (Linux VmHWM,
    reset through /proc/self/clear_refs) over 64 MiB of tensors: a copy this large would be mmap'ed and
    show in the peak. Tolerance: 8 MiB of other growth."""
    import safetensors.torch

    def resident(field: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    tensors = {"a": torch.ones(12 << 20), "b": torch.ones(4 << 20)}   # 48 + 16 MiB
    size = sum(t.nbytes for t in tensors.values())
    Path("/proc/self/clear_refs").write_text("5")
    before = resident("VmRSS")
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    assert abs(resident("VmHWM") - before) < 8 * MiB, (resident("VmHWM") - before) / size


# ---- the whole plan against a measured ppo_lagrangian.py run ----------------------------------


@pytest.mark.parametrize("stage", ["ppo_lagrangian", "rloo_lagrangian"])
def test_estimate_within_20_percent_of_measured_run(stage):
    """ppo_lagrangian.main (rloo_lagrangian.main: 2 prompts x 4 answers) in this process under the
    live-tensor counter: each phase's peak, and the part of it above the persistent bytes (activations,
    logits, KV cache), within 20% of the estimate; the save adds nothing in one process."""
    result = MP.measure_memory(per_device_prompt_batch_size=8, per_device_train_batch_size=4, max_length=64,
                               stage=stage, samples_per_prompt=4)
    assert list(result["measured"]) == ["persistent", "rollout", "scoring", "actor update"] + (
        ["critic update"] if stage == "ppo_lagrangian" else []) + ["saving", "peak"]
    measured, estimated = result["measured"], result["estimated"]
    for key in measured:
        assert abs(estimated[key] / measured[key] - 1) < 0.2, (key, result)
        if key not in ("persistent", "saving"):     # the save: below
            transient = measured[key] - measured["persistent"]
            assert abs((estimated[key] - estimated["persistent"]) / transient - 1) < 0.2, (key, result)
    # the save (this version's, sharded): in one process every tensor is written from itself, so nothing
    # above the persistent state (measured: a few kB below it); the files are the estimate's
    assert result["save"]["scheme"] == "sharded" and result["save"]["files"] == result["save"]["estimated_files"]
    assert estimated["saving"] == estimated["persistent"]
    assert abs(measured["saving"] - measured["persistent"]) < 64 << 10, result


def test_rloo_holds_the_ppo_plan_less_the_critics():
    """The same actor and frozen models; no critic states, scoring forwards or update; the rollout of
    P prompts x K answers is PPO-Lagrangian's rollout of P x K prompts."""
    config = M.preset_config("toy-small", vocab_size=101)
    sizes = dict(per_device_train_batch_size=4, max_length=32, prompt_length=8)
    ppo = MP.estimate_memory(config, 2, bf16=False, per_device_prompt_batch_size=8, **sizes)
    rloo = MP.estimate_memory(config, 2, bf16=False, per_device_prompt_batch_size=2, stage="rloo_lagrangian",
                              samples_per_prompt=4, **sizes)
    assert set(rloo["params"]) == {"actor", "reference", "reward_model", "cost_model"}
    critics = sum(sum(ppo["persistent"][c].values()) for c in ("reward_critic", "cost_critic"))
    assert rloo["persistent_total"] == ppo["persistent_total"] - critics > 0
    assert list(rloo["phases"]) == ["rollout", "scoring", "actor update"]
    assert rloo["phases"]["rollout"]["terms"] == ppo["phases"]["rollout"]["terms"]
    assert "both critics' roots (kept since scoring)" not in rloo["phases"]["actor update"]["terms"]


def test_dpo_holds_the_rloo_plan_less_the_score_models():
    """dpo.py's policy is trained as rloo's actor, its reference frozen the same way: the persistent state
    is rloo's less the reward and cost models' shards and their roots left gathered."""
    config = M.preset_config("toy-small", vocab_size=101)
    for bf16, W in ((False, 2), (True, 3)):
        rloo = MP.estimate_memory(config, W, bf16=bf16, stage="rloo_lagrangian", samples_per_prompt=4, **SIZES)
        dpo = MP.estimate_memory(config, W, bf16=bf16, stage="dpo", **SIZES)
        assert set(dpo["params"]) == {"policy", "reference"} and list(dpo["phases"]) == ["update"]
        assert dpo["persistent"]["policy"] == rloo["persistent"]["actor"]
        assert dpo["persistent"]["reference"] == rloo["persistent"]["reference"]
        c = 2 if bf16 else 4
        scorers = {n: MP.model_size(m, W) for n, m in MP.meta_models(config).items() if n.endswith("_model")}
        shares = sum(c * (s.shard + W * s.root_shard) for s in scorers.values())
        assert dpo["persistent_total"] == rloo["persistent_total"] - shares > 0


def test_dpo_update_is_the_actor_update_at_2b_rows():
    """A micro-batch of B pairs is 2B rows: the actor update's moments at 2B sequences, plus the policy's
    root kept gathered (never under gathered_weights) until the backward, and the reference's forward
    run first, before the policy's graph exists (below the forward's end)."""
    config = M.preset_config("toy-small", vocab_size=101)
    B, W = 4, 2
    sizes = dict(SIZES, per_device_train_batch_size=B)
    for gc in (False, True):
        dpo = MP.estimate_memory(config, W, bf16=True, stage="dpo", gradient_checkpointing=gc, **sizes)
        rloo = MP.estimate_memory(config, W, bf16=True, stage="rloo_lagrangian", samples_per_prompt=4,
                                  gradient_checkpointing=gc, **dict(sizes, per_device_train_batch_size=2 * B))
        ours = {k: v - dpo["persistent_total"] for k, v in dpo["phases"]["update"]["moments"].items()}
        actor = {k: v - rloo["persistent_total"] for k, v in rloo["phases"]["actor update"]["moments"].items()}
        root = 2 * W * MP.model_size(MP.meta_models(config, "dpo", scorers=False)["policy"], W).root_shard
        assert ours["backward, last layer"] == actor["backward, last layer"]   # the root is gathered there in both
        assert ours["forward end"] == actor["forward end"] + root
        assert ours["backward start"] == actor["backward start"] + root
        # run first: the reference's own no-grad work only, none of the policy's graph
        L = sizes["max_length"]
        assert ours["reference forward (before the policy's)"] == (MP.no_grad_layer_bytes(config, 2 * B * L, 2)
                                                                  + MP.logits_chain_bytes(config, 2 * B, L, 2))
        assert dpo["phases"]["update"]["total"] == max(dpo["phases"]["update"]["moments"].values())


def test_mocan_adds_its_offline_phase():
    config = M.preset_config("toy-small", vocab_size=101)
    dpo = MP.estimate_memory(config, 2, bf16=True, stage="dpo", **SIZES)
    mocan = MP.estimate_memory(config, 2, bf16=True, stage="dpo", method="mocan", **SIZES)
    assert list(mocan["phases"]) == ["offline (mocan)", "update"]
    assert mocan["persistent_total"] == dpo["persistent_total"]
    assert mocan["phases"]["update"] == dpo["phases"]["update"]
    assert mocan["phases"]["offline (mocan)"]["total"] > dpo["persistent_total"]
    assert max(p["total"] for p in mocan["phases"].values()) >= max(p["total"] for p in dpo["phases"].values())
    terms = mocan["phases"]["offline (mocan)"]["terms"]
    # the policy's gradients and AdamW moments do not exist yet; the score models' shards only here
    assert terms["policy grads, AdamW states (not yet allocated)"] == -(
        dpo["persistent"]["policy"]["fp32 grads"] + dpo["persistent"]["policy"]["AdamW states"])
    # dpo.Args' defaults; a larger sampling batch makes a larger phase
    import dpo as stage
    assert mocan["sizes"]["mocan_batch_size"] == stage.Args.mocan_batch_size == 16
    assert mocan["sizes"]["mocan_samples"] == stage.Args.mocan_samples == 8
    more = MP.estimate_memory(config, 2, bf16=True, stage="dpo", method="mocan", mocan_samples=16, **SIZES)
    assert more["phases"]["offline (mocan)"]["total"] > mocan["phases"]["offline (mocan)"]["total"]
    assert MP.Args.per_device_train_batch_size == stage.Args.per_device_train_batch_size
    assert MP.Args.max_length == stage.Args.max_length


def test_measure_dpo_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        MP.plumbing.run_main(MP.main, ["--measure", "--stage", "dpo"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --measure runs")


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-preset"], "not a preset"),
    (["--model", "./no/such/folder"], "not a preset"),
    (["--world_size", "1", "--no-fsdp"], "not modelled"),     # one GPU process runs under autocast
    (["--max_length", "64", "--prompt_length", "64"], "max_length"),
    (["--stage", "grpo"], "--stage grpo: choose ppo_lagrangian, rloo_lagrangian, dpo"),
    (["--stage", "rloo_lagrangian", "--samples_per_prompt", "1"], "--samples_per_prompt 1: must be a finite number >= 2"),
    (["--measure", "--stage", "dpo"], "--measure runs ppo_lagrangian or rloo_lagrangian only, not --stage dpo"),
    (["--method", "mocan"], "--method mocan: for --stage dpo only"),
    (["--stage", "dpo", "--method", "ipo"], "--method ipo: dpo.py's methods are"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(UserError, match=message):
        MP.main(argv)


def test_folder_without_config_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read its config"):
        MP.main(["--model", str(tmp_path)])
