"""model.py: score reading, checkpoints, tokenizer rules, FSDP2 against one process, sampling."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import model as M
import plumbing
from plumbing import UserError
from conftest import ROOT, run, torchrun


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return M.load_tokenizer(tokenizer_dir, "right")


def tiny_policy(tok, seed=0):
    torch.manual_seed(seed)
    return M.load_causal_lm("toy-tiny", tok)


def padded(tok, rows, side):
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_token_id)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(L - len(r), L)
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


ROWS = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 11, 12, 13, 2]]


# ---- ScoreModel ------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_end_score_is_score_at_last_attended_token(tok, side):
    torch.manual_seed(0)
    sm = M.load_score_model("toy-tiny", tok, "reward")
    ids, mask = padded(tok, ROWS, side)
    out = sm(ids, mask)
    L = ids.shape[1]
    for b, r in enumerate(ROWS):
        last = len(r) - 1 if side == "right" else L - 1      # hand-indexed last real token
        assert out.end_index[b].item() == last
        assert out.end_scores[b].item() == out.scores[b, last].item()
    assert out.scores.dtype == torch.float32 and out.scores.shape == ids.shape


def test_end_score_does_not_depend_on_padding_side(tok):
    torch.manual_seed(0)
    sm = M.load_score_model("toy-tiny", tok, "reward")
    r = sm(*padded(tok, ROWS, "right")).end_scores
    l = sm(*padded(tok, ROWS, "left")).end_scores
    torch.testing.assert_close(r, l, rtol=1e-4, atol=1e-5)


def test_right_padded_fast_path_matches_the_masked_forward(tok):
    """backbone_masking: without a mask, causal attention alone must give the real tokens of a
    right-padded batch exactly what the masked forward gives them (score model and policy)."""
    torch.manual_seed(0)
    sm, policy = M.load_score_model("toy-tiny", tok, "reward"), tiny_policy(tok)
    ids, mask = padded(tok, ROWS, "right")
    masked, fast = sm(ids, mask), sm(ids, mask, right_padded=True)
    torch.testing.assert_close(fast.end_scores, masked.end_scores, rtol=1e-5, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(fast.scores[real], masked.scores[real], rtol=1e-5, atol=1e-6)
    targets = mask[:, 1:].bool()                                 # log-probs of real next tokens
    torch.testing.assert_close(M.policy_logprobs(policy, ids, mask, right_padded=True)[targets],
                               M.policy_logprobs(policy, ids, mask)[targets], rtol=1e-5, atol=1e-6)
    # and the mask does matter for left padding: the fast path is only for right-padded batches
    ids_l, mask_l = padded(tok, ROWS, "left")
    assert not torch.allclose(sm(ids_l, mask_l).end_scores, sm(ids_l, mask_l, right_padded=True).end_scores)


def test_score_head_init_bias_zero(tok):
    sm = M.load_score_model("toy-tiny", tok, "cost")
    assert torch.all(sm.score_head.bias == 0)
    assert sm.score_head.weight.std() > 0


# ---- checkpoints -----------------------------------------------------------------------------

def test_policy_round_trip_bit_identical_and_plain_hf_load(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = tiny_policy(tok)
    M.save_checkpoint(tmp_path / "p", M.Dist(0, 0, 1, torch.device("cpu")), tok, {"": policy})
    ids, mask = padded(tok, ROWS, "right")
    before = policy(input_ids=ids, attention_mask=mask).logits
    again = M.load_causal_lm(str(tmp_path / "p"), M.load_tokenizer(tmp_path / "p", "right"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")          # no project code involved
    assert torch.equal(before, again(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(before, plain(input_ids=ids, attention_mask=mask).logits)


def test_score_model_round_trip_and_init_from_policy(tok, tmp_path):
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    policy = tiny_policy(tok)
    M.save_checkpoint(tmp_path / "policy", d, tok, {"": policy})
    sm = M.load_score_model(str(tmp_path / "policy"), tok, "reward")
    # initialised from a policy checkpoint: same backbone weights, fresh head
    psd, ssd = policy.state_dict(), sm.state_dict()
    backbone_keys = [k for k in ssd if k.startswith("model.")]
    assert backbone_keys and all(torch.equal(ssd[k], psd[k]) for k in backbone_keys)
    assert "lm_head.weight" not in ssd
    with torch.no_grad():
        sm.score_head.bias.fill_(0.25)      # a "trained" head must come back
    M.save_checkpoint(tmp_path / "rm", d, tok, {"": sm})
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["score_type"] == "reward" and cfg["architectures"] == ["LlamaForScore"]
    assert M.checkpoint_kind(tmp_path / "rm") == "reward" and M.checkpoint_kind(tmp_path / "policy") == "policy"
    back = M.load_score_model(str(tmp_path / "rm"), tok, "critic")
    ids, mask = padded(tok, ROWS, "right")
    assert torch.equal(sm(ids, mask).scores, back(ids, mask).scores)
    assert back.score_type == "critic"


def test_failed_save_leaves_previous_checkpoint(tok, tmp_path, monkeypatch):
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    folder = tmp_path / "ckpt"
    policy = tiny_policy(tok, seed=1)
    M.save_checkpoint(folder, d, tok, {"": policy})
    first = load_file(folder / "model.safetensors")

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(plumbing, "save_file", broken)    # dies after the weights, while writing train state
    with pytest.raises(RuntimeError):
        M.save_checkpoint(folder, d, tok, {"": tiny_policy(tok, seed=2)},
                          train_state={"tensors": {"x": torch.zeros(1)}, "json": {}})
    after = load_file(folder / "model.safetensors")
    assert all(torch.equal(first[k], after[k]) for k in first)
    assert not list(tmp_path.glob("ckpt.tmp-*"))


def test_crash_between_renames_is_recovered(tok, tmp_path):
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    M.save_checkpoint(tmp_path / "c", d, tok, {"": tiny_policy(tok)})
    (tmp_path / "c").rename(tmp_path / "c.old")      # the state a kill between the renames leaves
    (tmp_path / "c.tmp-999").mkdir()                # and a half-written temporary folder
    plumbing.recover_checkpoint(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").is_file()
    assert not (tmp_path / "c.old").exists() and not (tmp_path / "c.tmp-999").exists()


def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tok, tmp_path, tokenizer_dir):
    """Kill a process that saves over and over; whatever is on disk must load."""
    script = textwrap.dedent(f"""
        import sys, torch; sys.path.insert(0, {str(ROOT)!r})
        import model as M
        tok = M.load_tokenizer({str(tokenizer_dir)!r}, "right")
        d = M.Dist(0, 0, 1, torch.device("cpu"))
        for i in range(10000):
            torch.manual_seed(i)
            m = M.load_causal_lm("toy-small", tok)
            M.save_checkpoint({str(tmp_path / 'k')!r}, d, tok, {{"": m}})
            print(i, flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "0"          # one complete save exists
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    plumbing.recover_checkpoint(tmp_path / "k")
    m = M.load_causal_lm(str(tmp_path / "k"), tok)     # loads (no half-written weights)
    assert plumbing.count_parameters(m) > 0


# ---- bad input: one clear line ---------------------------------------------------------------

def test_bad_model_inputs_give_one_line(tok, tmp_path):
    with pytest.raises(UserError, match="unknown model preset 'toy-huge'"):
        M.preset_config("toy-huge")
    with pytest.raises(UserError, match="does not exist"):
        M.load_causal_lm(str(tmp_path / "nope"), tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint folder"):
        M.load_score_model(str(tmp_path / "empty"), tok, "reward")
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        M.load_tokenizer(tmp_path / "empty", "right")


def test_run_main_prints_one_line(tmp_path):
    p = run([sys.executable, "-c", "import model as M, plumbing\ndef f(): M.preset_config('bogus')\nplumbing.run_main(f)"])
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: unknown model preset")


# ---- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_pad_added_distinct_from_eos_and_embeddings_resized(tokenizer_dir_nopad):
    tok = M.load_tokenizer(tokenizer_dir_nopad, "left")
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    policy = M.load_causal_lm("toy-tiny", tok)
    assert policy.get_input_embeddings().weight.shape[0] == len(tok)
    assert policy.config.pad_token_id == tok.pad_token_id
    assert tok("fix </s>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id


# ---- math helpers ----------------------------------------------------------------------------

def test_masked_means_against_loops():
    torch.manual_seed(0)
    x, m = torch.randn(3, 5), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]).float()
    vals = [x[b, t].item() for b in range(3) for t in range(5) if m[b, t]]
    assert M.masked_mean(x, m).item() == pytest.approx(sum(vals) / len(vals), abs=1e-6)
    per_seq = [sum(x[b, t].item() for t in range(5) if m[b, t]) / m[b].sum().item() for b in range(3)]
    assert M.masked_sequence_mean(x, m).item() == pytest.approx(sum(per_seq) / 3, abs=1e-6)


def test_sequence_logprobs_shift_and_temperature_against_loop():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    got = M.sequence_logprobs(logits, ids, temperature=0.5)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t] / 0.5, -1)[ids[b, t + 1]]
            assert got[b, t].item() == pytest.approx(torch.log(p).item(), rel=1e-5)


def test_sample_pads_after_eos_and_mask_matches(tok):
    policy = tiny_policy(tok)
    torch.nn.init.zeros_(policy.lm_head.weight)               # uniform: EOS comes at random steps
    gen_tok = M.load_tokenizer(tok.name_or_path, "left")
    enc = gen_tok(["how do i bake bread", "fix"], return_tensors="pt", padding=True)
    torch.manual_seed(3)
    seqs, mask = M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=60,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    S = enc.input_ids.shape[1]
    assert torch.equal(mask[:, :S], enc.attention_mask)
    for b in range(2):
        gen, gm = seqs[b, S:].tolist(), mask[b, S:].tolist()
        # the row ends at its first EOS (kept) or at a sampled PAD (left out); PAD after the end
        end = next((t + (x == tok.eos_token_id) for t, x in enumerate(gen) if x in (tok.eos_token_id, tok.pad_token_id)),
                   len(gen))
        assert gm == [1] * end + [0] * (len(gen) - end)
        assert all(t == tok.pad_token_id for t in gen[end:])


def test_a_sampled_pad_ends_the_row_outside_it(tok):
    """PAD is in the vocabulary, so a policy can sample it: the row ends there, the PAD masked out
    (the official mask is ids != PAD), and the other row goes on."""
    policy = tiny_policy(tok)
    steps = []

    def force_pad(module, args, output):   # no EOS anywhere; row 0's third generated token: PAD
        steps.append(None)
        output.logits[:, -1, tok.eos_token_id] = -1e4
        if len(steps) == 3:
            output.logits[0, -1, tok.pad_token_id] = 1e4
        return output
    policy.register_forward_hook(force_pad)
    gen_tok = M.load_tokenizer(tok.name_or_path, "left")
    enc = gen_tok(["how do i bake bread", "fix"], return_tensors="pt", padding=True)
    torch.nn.init.zeros_(policy.lm_head.weight)
    seqs, mask = M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=6,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    S = enc.input_ids.shape[1]
    assert seqs[0, S + 2].item() == tok.pad_token_id and mask[0, S:].tolist() == [1, 1, 0, 0, 0, 0]
    assert (seqs[0, S + 2:] == tok.pad_token_id).all() and mask[1, S:].sum() == 6 - (seqs[1, S:] == tok.pad_token_id).sum()


def test_sample_uses_the_kv_cache_consistently(tok):
    """Greedy decoding with the cache equals greedy decoding by full re-forwarding (left-padded)."""
    policy = tiny_policy(tok, seed=5)
    gen_tok = M.load_tokenizer(tok.name_or_path, "left")
    enc = gen_tok(["how do i bake bread", "fix"], return_tensors="pt", padding=True)
    seqs, mask = M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=6,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0)
    ids, m = enc.input_ids, enc.attention_mask
    for _ in range(seqs.shape[1] - ids.shape[1]):
        logits = policy(input_ids=ids, attention_mask=m, position_ids=M.position_ids_from_mask(m)).logits
        nxt = logits[:, -1].argmax(-1)
        ids, m = torch.cat([ids, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    done = (seqs == tok.eos_token_id).cumsum(1) > 0
    same = (seqs == ids) | (done & (mask == 0))
    assert same.all()


@pytest.mark.parametrize("temperature,budget", [(1.0, 12), (1.0, 40), (0.0, 12), (0.0, 40)])
def test_static_cache_samples_exactly_what_the_growing_cache_samples(tok, temperature, budget):
    """sample(static_cache=True) (eager, the step not compiled) against today's growing cache, on three
    prompts left-padded by different amounts, same seed: the same tokens and mask, token for token.
    A hook on the logits (the same on both paths: one forward per step) forces what must be covered:
    row 0 samples UNK at its 2nd token (a hole; the row goes on, positions counting real tokens only),
    row 1 ends with EOS at its 4th, row 2 runs on; with budget 12 every row is sent EOS at the 9th
    token (the all-done stop: T = 9 < 12), with budget 40 the budget ends it (T = 40)."""
    policy = tiny_policy(tok, seed=11)
    unk, eos, pad = tok.unk_token_id, tok.eos_token_id, tok.pad_token_id
    steps = []

    def force(module, args, output):  # forward 1 is the prompt's; forward k + 1 predicts the (k + 1)-th token
        steps.append(None)
        logits = output.logits[:, -1]
        logits[:, [eos, pad]] = -1e4                       # no EOS or PAD unless forced
        forced = {2: (0, unk), 4: (1, eos)}.get(len(steps))
        if forced:
            logits[forced[0], forced[1]] = 1e4
        if budget == 12 and len(steps) == 9:
            logits[:, eos] = 1e4
        return output
    policy.register_forward_hook(force)
    gen_tok = M.load_tokenizer(tok.name_or_path, "left")
    enc = gen_tok(["fix", "how do i bake bread", "a bike"], return_tensors="pt", padding=True)
    runs = []
    for static in (False, True):
        steps.clear()
        runs.append(M.sample(policy, enc.input_ids, enc.attention_mask, max_new_tokens=budget, eos_token_id=eos,
                             pad_token_id=pad, unk_token_id=unk, temperature=temperature,
                             generator=torch.Generator().manual_seed(7), static_cache=static))
    (seqs, mask), (static_seqs, static_mask) = runs
    S, T = enc.input_ids.shape[1], 9 if budget == 12 else budget
    assert (enc.attention_mask == 0).sum(1).unique().numel() == 3              # three padding lengths
    assert seqs.shape == mask.shape == (3, S + T)
    assert torch.equal(static_seqs, seqs) and torch.equal(static_mask, mask)
    gen = seqs[:, S:]
    assert gen[0, 1] == unk                                                    # the forced hole
    for row in (0, 2):  # going on after every hole (more are sampled at temperature 1): 0 exactly at the UNKs
        assert torch.equal(mask[row, S:], (gen[row] != unk).long()) and not (gen[row, :-1] == eos).any()
    assert gen[1, 3] == eos and (gen[1, 4:] == pad).all() and mask[1, S:].tolist() == [1] * 4 + [0] * (T - 4)


# ---- torchrun: 2 ranks with FSDP2 against one process ----------------------------------------

def test_fsdp_two_ranks_match_one_process(tmp_path, tokenizer_dir):
    p = run([sys.executable, "tests/dist_worker.py", "init", tmp_path, tokenizer_dir])
    assert p.returncode == 0, p.stderr[-3000:]
    one = run([sys.executable, "tests/dist_worker.py", "step", tmp_path / "one", tmp_path / "init"])
    assert one.returncode == 0, one.stderr[-3000:]
    # rank 1 builds a meta skeleton and gets rank 0's weights through the sharding broadcast
    two = torchrun(2, ["tests/dist_worker.py", "step", tmp_path / "two", tmp_path / "init"], timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = json.loads((tmp_path / "one" / "loss.json").read_text())["loss"]
    l2 = json.loads((tmp_path / "two" / "loss.json").read_text())["loss"]
    assert l1 == pytest.approx(l2, rel=1e-5)
    a = load_file(tmp_path / "one" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "two" / "ckpt" / "model.safetensors")
    assert sorted(a) == sorted(b)
    # Tolerance: different reduction order gives ~1e-7 relative gradient differences; after one
    # AdamW step at lr 1e-2 (update ~ lr * sign) weights agree to ~1e-5.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
    # the 2-rank checkpoint loads in one process
    tok = M.load_tokenizer(tmp_path / "two" / "ckpt", "right")
    assert plumbing.count_parameters(M.load_causal_lm(str(tmp_path / "two" / "ckpt"), tok)) > 0


def test_fsdp_generation_with_ranks_finishing_at_different_steps(tmp_path, tokenizer_dir):
    p = torchrun(2, ["tests/dist_worker.py", "generate", tmp_path, tokenizer_dir], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r0 = json.loads((tmp_path / "gen_rank0.json").read_text())
    r1 = json.loads((tmp_path / "gen_rank1.json").read_text())
    assert r0["finished"] and r1["finished"]
    assert r0["columns"] == r1["columns"]                     # same number of decoding steps
    assert max(r0["lengths"]) != max(r1["lengths"])           # yet the ranks finished at different steps
    assert r0["static_equal"] and r1["static_equal"]          # the static cache: the same tokens, in lockstep too


def test_activation_checkpointing_gives_the_same_gradients(tok):
    ids, mask = padded(tok, ROWS, "right")
    grads = []
    for ckpt in (False, True):
        policy = M.prepare_model(tiny_policy(tok, seed=7), M.Dist(0, 0, 1, torch.device("cpu")),
                                 trainable=True, bf16=False, activation_checkpointing=ckpt)
        policy.train()
        M.policy_logprobs(policy, ids, mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    assert policy.model.gradient_checkpointing
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_pairs_score_as_separate_rows_on_every_attention_backend(tokenizer_dir, implementation):
    """--share_prompt's packed rows (reward.pack_pairs, a 4D boolean mask) give each response the score
    it gets in a row of its own, under SDPA and under eager attention, which adds a 4D mask to the
    logits instead of masking with it (a boolean mask there masked nothing: scores moved by ~0.04 on
    this model, by up to 1.4 on the toy world's trained reward model)."""
    import reward

    tok = M.load_tokenizer(tokenizer_dir, "right")
    torch.manual_seed(0)
    model = M.load_score_model("toy-tiny", tok, "reward")
    model.model.set_attn_implementation(implementation)
    assert model.model.config._attn_implementation == implementation
    ids = lambda text: tok(M.format_prompt("how do i bake bread") + " " + text)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    pairs = [{"first": ids("knead the dough"), "second": ids("sorry cannot help with that"), "labels": [1.0]},
             {"first": ids("call a professional first"), "second": ids("fix a bike"), "labels": [0.0]}]
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    packed = reward.forward_pairs(model, reward.pack_pairs(pairs, tok.pad_token_id), d)
    separate = reward.forward_pairs(model, reward.collate_pairs(pairs, tok.pad_token_id), d)
    torch.testing.assert_close(packed[0], separate[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed[1], separate[1], rtol=0, atol=1e-6)


def test_packing_is_refused_where_the_backend_cannot_take_a_4d_mask(tokenizer_dir):
    tok = M.load_tokenizer(tokenizer_dir, "right")
    model = M.load_score_model("toy-tiny", tok, "reward")
    M.check_packing(model)
    model.config._attn_implementation = "flash_attention_2"   # what a GPU user may load (no flash kernels on CPU)
    with pytest.raises(UserError, match="^--share_prompt: packed pairs need a 4D attention mask, which flash_attention_2"):
        M.check_packing(model)
