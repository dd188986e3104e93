"""sft.py, reward.py, cost.py: losses against hand-computed values, gradient signs, metric definitions,
SFT labels, then each script end to end (one process, two ranks, interrupted + resumed) and bad input.

The toy world is generated once per session into a temporary folder; nothing is written into the
repository's data/ or runs/.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data_rules
import model as M
import plumbing
from plumbing import UserError
from conftest import ROOT, run, torchrun

import cost
import reward
import sft

# tiny runs: toy-tiny policy, a few steps on a slice of the toy data
SFT_FAST = ["--model_name_or_path", "toy-tiny", "--limit", "64", "--eval_limit", "32", "--epochs", "1",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--lr", "1e-3",
            "--log_every", "1", "--toy_eval_samples", "0"]
PAIR_FAST = ["--limit", "48", "--eval_limit", "20", "--epochs", "1", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "8", "--log_every", "1"]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    import toyworld
    return toyworld.ensure_toy_data(tmp_path_factory.mktemp("toy") / "world")


@pytest.fixture(scope="session")
def toy_tok(toy):
    return M.load_tokenizer(toy / "tokenizer", "right")


def sft_cmd(toy, out, *extra):
    return [sys.executable, "sft.py", "--dataset", toy / "sft", "--tokenizer_name_or_path", toy / "tokenizer",
            "--output_dir", out, *SFT_FAST, *extra]


def pair_cmd(script, toy, init, out, *extra):
    return [sys.executable, script, "--dataset", toy / "preference", "--model_name_or_path", init,
            "--output_dir", out, *PAIR_FAST, *extra]


def ok(p):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="session")
def sft_run(toy, tmp_path_factory):
    """An uninterrupted SFT run (4 optimiser steps of 2 micro-batches), checkpoint every step, with the
    toy-world oracle evaluation on: the smoke test of sft.py and the init of the reward/cost runs."""
    out = tmp_path_factory.mktemp("sft") / "run"
    ok(run(sft_cmd(toy, out, "--save_every", "1", "--toy_eval_samples", "1", "--max_new_tokens", "8")))
    return out


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


# ---- eq. 5: the reward loss ------------------------------------------------------------------

def test_reward_loss_hand_values():
    # one pair r_w = 1, r_l = 0: -log sigma(1) = log(1 + e^-1) = 0.31326
    assert reward.reward_loss(torch.tensor([1.0]), torch.tensor([0.0]), 0.0).item() == pytest.approx(0.313262, abs=1e-6)
    # two pairs (2, 0) and (0, 1): mean(log(1 + e^-2), log(1 + e^1)) = (0.126928 + 1.313262) / 2 = 0.720095
    got = reward.reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), 0.0).item()
    assert got == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-6)
    # regulariser: eta * mean of the 2B squared scores = 0.1 * (4 + 0 + 0 + 1) / 4 = 0.125
    got = reward.reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), 0.1).item()
    assert got == pytest.approx(0.720095 + 0.125, abs=1e-6)


def test_reward_loss_gradient_raises_the_better_score():
    better, worse = torch.tensor([0.3, -1.0], requires_grad=True), torch.tensor([0.5, 2.0], requires_grad=True)
    reward.reward_loss(better, worse, 0.0).backward()
    assert (better.grad < 0).all() and (worse.grad > 0).all()     # descent raises R(y_w), lowers R(y_l)
    # d/dr_w of -log sigma(r_w - r_l) / B = -(1 - sigma(r_w - r_l)) / B
    expected = -(1 - torch.sigmoid(torch.tensor([0.3 - 0.5, -1.0 - 2.0]))) / 2
    torch.testing.assert_close(better.grad, expected)


def test_ranking_accuracy_is_strict():
    higher, lower = torch.tensor([1.0, 0.5, 0.0, -1.0]), torch.tensor([0.0, 0.5, 1.0, -2.0])
    assert reward.ranking_accuracy(higher, lower).item() == 0.5   # the tie (0.5, 0.5) counts as wrong
    m = reward.reward_metrics(higher, lower, torch.zeros(4, 0))
    scores = torch.cat([higher, lower])
    assert m["accuracy"] == 0.5
    assert m["reward_mean"] == pytest.approx(scores.mean().item())
    assert m["reward_std"] == pytest.approx(scores.std().item())


def test_shared_prefix_leaves_each_sequence_a_token():
    assert reward.shared_prefix([1, 2, 3, 9], [1, 2, 4]) == 2
    assert reward.shared_prefix([1, 2, 3], [1, 2, 3, 4, 5]) == 2     # the first keeps its last token
    assert reward.shared_prefix([7, 2], [1, 2]) == 0


def test_packed_pairs_score_and_train_like_two_rows(toy, toy_tok):
    """pack_pairs puts prompt + both responses in one row under a custom mask: the end scores and the
    gradients must be those of the plain [first; second] right-padded batch."""
    pairs, _ = reward.load_pairs(str(toy / "preference"), "train", toy_tok, reward.REWARD, max_length=512, limit=6)
    eos = toy_tok.eos_token_id
    pairs += [{"first": [1, 5, 6, eos], "second": [1, 5, 6, 7, 8, eos], "labels": []},   # first a prefix of second
              {"first": [1, 9, 9, 9, 9, 9, eos], "second": [1, 4, eos], "labels": []}]   # almost nothing shared
    d = M.Dist(0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    sm = M.load_score_model("toy-tiny", toy_tok, "reward")
    results = []
    for make in (reward.collate_pairs, reward.pack_pairs):
        sm.zero_grad()
        first, second, _ = reward.forward_pairs(sm, make(pairs, toy_tok.pad_token_id), d)
        reward.reward_loss(first, second, 0.001).backward()
        results.append((first.detach(), second.detach(), {n: q.grad.clone() for n, q in sm.named_parameters()}))
    (f1, s1, g1), (f2, s2, g2) = results
    torch.testing.assert_close(f2, f1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)
    packed = reward.pack_pairs(pairs, toy_tok.pad_token_id)
    assert packed["input_ids"].shape[1] == max(reward.packed_length(p) for p in pairs)


def test_reward_pairs_follow_better_response_id():
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1}
    assert reward.better_worse(row, "row 0") == ("b", "a", [])
    assert reward.better_worse(dict(row, better_response_id="0"), "row 0")[:2] == ("a", "b")
    with pytest.raises(UserError, match="row 7: better_response_id must be 0 or 1"):
        reward.better_worse(dict(row, better_response_id=2), "row 7")


# ---- eq. 6: the cost loss --------------------------------------------------------------------

def test_cost_loss_hand_values():
    # safer C(y_l) = -1 labelled safe (s = -1), unsafer C(y_w) = 1 labelled unsafe (s = +1):
    # ranking -log sigma(1 - (-1)) = log(1 + e^-2) = 0.126928; classification 2 * log(1 + e^-1) = 0.626523
    got = cost.cost_loss(torch.tensor([-1.0]), torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([1.0]), 0.0)
    assert got.item() == pytest.approx(0.126928 + 0.626523, abs=1e-6)
    # both unsafe (s = +1, +1), C = 0 and 2: log(1 + e^-2) + log 2 + log(1 + e^-2) = 0.946026; regulariser
    # 0.5 * (0 + 4) / 2 = 1.0
    got = cost.cost_loss(torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]), 0.5)
    assert got.item() == pytest.approx(2 * 0.126928 + math.log(2) + 1.0, abs=1e-6)


def test_cost_loss_gradient_signs():
    safer, unsafer = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    safer_sign, unsafer_sign = torch.tensor([-1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, -1.0, 1.0, 1.0])
    # the ranking term alone: the more harmful response's cost goes up, the safer one's down
    loss = cost.cost_loss(safer, unsafer, safer_sign, unsafer_sign, 0.0)
    ranking = -torch.nn.functional.logsigmoid(unsafer - safer).mean()
    g_safer, g_unsafer = torch.autograd.grad(ranking, [safer, unsafer], retain_graph=True)
    assert (g_unsafer < 0).all() and (g_safer > 0).all()
    # the classification term alone: dL/dC has the sign of -s, so descent moves C towards the label's
    # sign (a safe response's cost down, an unsafe one's up)
    classification = loss - ranking
    g_safer, g_unsafer = torch.autograd.grad(classification, [safer, unsafer], retain_graph=True)
    assert torch.equal(torch.sign(g_safer), -safer_sign) and torch.equal(torch.sign(g_unsafer), -unsafer_sign)
    # the whole loss: the unsafer's cost always goes up; a safe safer response's cost always down
    g_safer, g_unsafer = torch.autograd.grad(loss, [safer, unsafer])
    assert (g_unsafer[unsafer_sign > 0] < 0).all() and (g_safer[safer_sign < 0] > 0).all()


def test_cost_pairs_sign_convention():
    """y_w is the MORE harmful response; s = +1 for a response labelled unsafe, -1 for safe."""
    row = {"prompt": "p", "response_0": "harmful", "response_1": "refusal", "safer_response_id": 1,
           "is_response_0_safe": False, "is_response_1_safe": True}
    safer, unsafer, signs = cost.safer_unsafer(row, "row 0")
    assert (safer, unsafer, signs) == ("refusal", "harmful", [-1.0, 1.0])
    both_unsafe = dict(row, safer_response_id=0, is_response_1_safe=False)
    assert cost.safer_unsafer(both_unsafe, "row 0") == ("harmful", "refusal", [1.0, 1.0])
    contradictory = dict(row, safer_response_id=0)   # the safer one labelled unsafe, the other safe
    with pytest.raises(data_rules.Unusable, match="inconsistent safety labels"):  # dropped and counted, not trained on
        cost.safer_unsafer(contradictory, "row 3")
    # a model that gets the convention right: C < 0 on the safe one, C > 0 on the unsafe one
    m = cost.cost_metrics(torch.tensor([-2.0]), torch.tensor([3.0]), torch.tensor([signs]))
    assert m["accuracy"] == 1 and m["accuracy_sign"] == 1


def test_cost_loss_terms_for_the_ablations():
    """Eq. 6's two terms by hand for one pair, and each alone (figure 6a's CM-classifier and pairwise-only)."""
    safer, unsafer, s_safer, s_unsafer = torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([1.0])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ranking = -math.log(sigmoid(2.0 - (-1.0)))
    classification = -math.log(sigmoid(1.0 * 2.0)) - math.log(sigmoid(-1.0 * -1.0))
    for terms, expected in (("both", ranking + classification), ("ranking", ranking), ("classification", classification)):
        assert cost.cost_loss(safer, unsafer, s_safer, s_unsafer, 0.0, terms).item() == pytest.approx(expected)


def test_cost_metrics_definitions():
    safer = torch.tensor([-1.0, 0.0, 2.0, -0.5])
    unsafer = torch.tensor([1.0, 0.0, 1.0, 3.0])
    signs = torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])   # (safer, unsafer)
    m = cost.cost_metrics(safer, unsafer, signs)
    assert m["accuracy"] == 0.5                      # pairs 0 and 3 right; the tie (0, 0) and (2 > 1) wrong
    # sign accuracy over all 8 responses, strict: right are -1/safe, 1/unsafe, 2/unsafe, 1/unsafe, -0.5/safe
    assert m["accuracy_sign"] == pytest.approx(5 / 8)
    # safe responses: -1, 0, -0.5, 3 -> C < 0 for 2 of 4; unsafe: 1, 0, 2, 1 -> C > 0 for 3 of 4
    assert m["safe_negative_rate"] == pytest.approx(2 / 4)
    assert m["unsafe_positive_rate"] == pytest.approx(3 / 4)
    # the calibration a derived threshold reads: mean C of the safe ones, of the unsafe ones
    assert m["safe_cost_mean"] == pytest.approx((-1 + 0 - 0.5 + 3) / 4) and m["unsafe_cost_mean"] == pytest.approx(1.0)
    assert cost.safety_sign_accuracy(torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])).item() == 0  # C = 0 wrong


# ---- SFT labels ------------------------------------------------------------------------------

def test_sft_labels_mask_prompt_and_padding(toy_tok):
    """The examples sft.py trains on (model.tokenize_prompt_response + collate_right), by hand."""
    request, response = "how do i bake bread?", "mix flour and water."
    (example,), truncated = M.tokenize_prompt_response(toy_tok, [request], [response], max_length=512)
    ids, labels = example["input_ids"], example["labels"]
    # by hand: BOS + 14 prompt tokens (BEGINNING OF CONVERSATION : USER : how do i bake bread ? ASSISTANT :),
    # then the response "mix flour and water ." and the EOS, appended with no separator
    n_prompt = 1 + 14
    assert truncated == 0 and ids[0] == toy_tok.bos_token_id
    assert toy_tok.convert_ids_to_tokens(ids[1:n_prompt]) == toy_tok.tokenize(M.format_prompt(request))
    assert toy_tok.convert_ids_to_tokens(ids[n_prompt:]) == ["mix", "flour", "and", "water", ".", "</s>"]
    assert labels == [-100] * n_prompt + ids[n_prompt:]               # prompt (BOS included) masked
    (short,), _ = M.tokenize_prompt_response(toy_tok, ["fix"], ["."], max_length=512)
    input_ids, attention_mask, batch_labels = M.collate_right([example, short], toy_tok.pad_token_id)
    n_short = len(short["input_ids"])
    assert batch_labels[1, n_short:].eq(-100).all() and input_ids[1, n_short:].eq(toy_tok.pad_token_id).all()
    assert attention_mask[1].tolist() == [1] * n_short + [0] * (len(ids) - n_short)   # padding: mask 0, label -100
    assert batch_labels[1, n_short - 2:n_short].tolist() == [input_ids[1, n_short - 2].item(), toy_tok.eos_token_id]
    # the summed loss counts exactly the response tokens + EOS, with the one-token shift
    logprobs = torch.randn(2, len(ids) - 1)
    loss_sum, n = sft.sft_loss_sum(logprobs, batch_labels)
    assert n.item() == 6 + 2
    expected = -(logprobs[0, n_prompt - 1:].sum() + logprobs[1, n_short - 3:n_short - 1].sum())  # token t+1 at t
    torch.testing.assert_close(loss_sum, expected)
    # truncation may cut the EOS; what is left of the response is still trained
    (cut,), truncated = M.tokenize_prompt_response(toy_tok, [request], [response], max_length=n_prompt + 2)
    assert truncated == 1 and cut["labels"] == [-100] * n_prompt + ids[n_prompt:n_prompt + 2]


def test_sft_loss_matches_cross_entropy(toy_tok):
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    loss_sum, n = sft.sft_loss_sum(M.sequence_logprobs(logits, ids), labels)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="mean")
    torch.testing.assert_close(loss_sum / n, ce)


def test_help_lists_every_field(capsys):
    for args_cls in (sft.Args, reward.Args):
        with pytest.raises(SystemExit):
            plumbing.parse_args(args_cls, ["--help"])
        text = capsys.readouterr().out
        for f in dataclasses.fields(args_cls):
            assert f"--{f.name}" in text
        assert "(filled in)" in text and "truncated on the right" in text


# ---- the scripts end to end ------------------------------------------------------------------

def test_sft_smoke_and_resume_equals_uninterrupted(sft_run, toy, tmp_path, toy_tok):
    """sft_run went 4 steps in one go; here: stop after step 2, then --resume to the end."""
    args = json.loads((sft_run / "args.json").read_text())
    assert args["total_steps"] == 4 and args["global_batch_size"] == 16
    records = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    result = json.loads((sft_run / "eval.json").read_text())
    assert {"eval/loss", "toy/unsafe_rate", "toy/corpus_unsafe_rate"} <= set(result)
    out = tmp_path / "b"
    ok(run(sft_cmd(toy, out, "--stop_at_step", "2")))
    assert json.loads((out / "train_state.json").read_text())["trainer"]["step"] == 2
    assert not (out / "eval.json").exists()
    ok(run(sft_cmd(toy, out, "--resume")))
    assert_same_weights(sft_run, out)
    assert json.loads((out / "train_state.json").read_text())["trainer"]["step"] == 4
    from transformers import AutoModelForCausalLM
    assert plumbing.count_parameters(AutoModelForCausalLM.from_pretrained(out)) > 0   # a plain HF load


@pytest.mark.parametrize("script", ["reward.py", "cost.py"])
def test_pair_scripts_smoke_and_resume_equals_uninterrupted(script, sft_run, toy, tmp_path, toy_tok):
    """Chained from the SFT checkpoint: uninterrupted (6 steps), and stopped after 3 then resumed."""
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run(pair_cmd(script, toy, sft_run, a)))
    result = json.loads((a / "eval.json").read_text())
    assert 0 <= result["eval/accuracy"] <= 1
    if script == "cost.py":
        assert {"eval/accuracy_sign", "eval/safe_negative_rate", "eval/unsafe_positive_rate"} <= set(result)
    ok(run(pair_cmd(script, toy, sft_run, b, "--stop_at_step", "3")))
    ok(run(pair_cmd(script, toy, sft_run, b, "--resume")))
    assert_same_weights(a, b)
    score_type = "reward" if script == "reward.py" else "cost"
    sm = M.load_score_model(str(a), toy_tok, score_type)
    assert sm.score_type == score_type and json.loads((a / "config.json").read_text())["score_type"] == score_type
    # the trained head came back, not a fresh one (whose bias is zero)
    assert sm.score_head.bias.abs().item() > 0


def test_two_ranks_each_script_saves_a_loadable_checkpoint(sft_run, toy, tmp_path, toy_tok):
    p = torchrun(2, ["sft.py", "--dataset", toy / "sft", "--tokenizer_name_or_path", toy / "tokenizer",
                     "--output_dir", tmp_path / "sft", *SFT_FAST, "--toy_eval_samples", "1", "--max_new_tokens", "4"])
    ok(p)
    # the ranks leave through model.teardown_distributed (os._exit after the atexit handlers and a flush):
    # the run folder's lock is gone and the last line printed arrived
    assert not (tmp_path / "sft.lock").exists() and p.stdout.strip().splitlines()[-1].startswith(f"saved {tmp_path / 'sft'}")
    assert plumbing.count_parameters(M.load_causal_lm(str(tmp_path / "sft"), toy_tok)) > 0
    assert json.loads((tmp_path / "sft" / "args.json").read_text())["global_batch_size"] == 32
    for script, score_type in (("reward.py", "reward"), ("cost.py", "cost")):
        ok(torchrun(2, pair_cmd(script, toy, tmp_path / "sft", tmp_path / score_type)[1:]))
        assert not (tmp_path / f"{score_type}.lock").exists()
        sm = M.load_score_model(str(tmp_path / score_type), toy_tok, score_type)
        ids = torch.tensor([[1, 5, 6, 2]])
        assert sm(ids, torch.ones_like(ids)).end_scores.shape == (1,)
        assert "eval/accuracy" in json.loads((tmp_path / score_type / "eval.json").read_text())


# ---- bad input: one line, exit code 2, nothing written ---------------------------------------

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(p, *fragments):
    assert p.returncode == 2, p.stdout[-1000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_init_checkpoint_is_one_line(toy, tmp_path):
    # the default init runs/sft, relative to a folder that has none
    p = run([sys.executable, ROOT / "reward.py", "--dataset", toy / "preference", "--output_dir", tmp_path / "out"],
            cwd=tmp_path)
    one_line_error(p, "checkpoint runs/sft does not exist (run sft.py first)")
    assert not (tmp_path / "out").exists()


def test_bad_data_is_one_line_and_leaves_the_output_folder_alone(sft_run, toy, tmp_path):
    good = [json.loads(line) for line in (toy / "preference" / "test.jsonl").read_text().splitlines()[:4]]
    missing = [good[0], {k: v for k, v in good[1].items() if k not in ("better_response_id", "safer_response_id")}]
    cases = {
        "missing": (write_jsonl(tmp_path / "missing.jsonl", missing), "row 1 has no field 'better_response_id'"),
        "empty": (write_jsonl(tmp_path / "empty.jsonl", []), "is empty"),
        "unreadable": (tmp_path / "garbage.jsonl", "line 1: not a JSON row"),
        "no such file": (tmp_path / "nope.jsonl", "no such file or folder"),
    }
    (tmp_path / "garbage.jsonl").write_text("this is not json {\n")
    out = tmp_path / "out"
    with plumbing.atomic_folder(out) as tmp:   # a folder the project wrote (it is refused otherwise)
        (tmp / "keep.txt").write_text("previous run")
    # one case through a subprocess (exit code, stderr), the others in-process (same code path)
    p = run([sys.executable, "reward.py", "--recipe", "toy", "--dataset", cases["missing"][0], "--model_name_or_path", sft_run,
             "--output_dir", out])
    one_line_error(p, "row 1 has no field 'better_response_id'", "missing.jsonl")
    for name, (path, message) in cases.items():
        for objective in (reward.REWARD, cost.COST):
            args = reward.Args(dataset=str(path), model_name_or_path=str(sft_run), output_dir=str(out))
            if name == "missing" and objective is cost.COST:
                message = "row 1 has no field 'safer_response_id'"
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
                reward.train(args, objective)
    sft_missing = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "how do i bake bread?", "input": ""}])
    with pytest.raises(UserError, match="row 0 has no field 'output'"):
        sft.main(sft.Args(dataset=str(sft_missing), model_name_or_path="toy-tiny",
                          tokenizer_name_or_path=str(toy / "tokenizer"), output_dir=str(out)))
    with pytest.raises(UserError, match="does not exist"):
        reward.train(reward.Args(dataset=str(toy / "preference"), model_name_or_path=str(tmp_path / "none"),
                                 output_dir=str(out)), reward.REWARD)
    assert sorted(p.name for p in out.iterdir()) == [plumbing.MARKER, "keep.txt"]


def test_unusable_pairs_are_dropped_and_counted(tmp_path, toy_tok):
    same = {"prompt": "how do i bake bread?", "response_0": "mix flour and water.", "response_1": "mix flour and water.",
            "better_response_id": 0}
    good = dict(same, response_1="knead the dough.")
    path = write_jsonl(tmp_path / "same.jsonl", [same, good, dict(same, response_0=" "), good])
    summary = data_rules.DataSummary("--dataset", str(path), "train")
    pairs, _ = reward.load_pairs(str(path), "train", toy_tok, reward.REWARD, max_length=512, drop_duplicates=True,
                                 summary=summary)
    assert len(pairs) == 1 and summary.read == 4 and summary.used == 1
    assert summary.dropped == {"identical after truncation": [0], "empty response": [2], "duplicate": [3]}
    with pytest.raises(UserError, match=r"--strict: --dataset .*same.jsonl \(split train\) row 0: identical after truncation"):
        summary.check(strict=True)
    assert summary.check(strict=False)[0].startswith("WARNING:")     # 75% dropped: loud


def test_truncation_is_counted(toy, toy_tok):
    args = sft.Args(dataset=str(toy / "sft"), max_length=20)
    summary = data_rules.DataSummary("--dataset", args.dataset, "test")
    examples, truncated = sft.load_examples(args.dataset, "test", toy_tok, max_length=20, limit=50, summary=summary)
    assert all(len(e["input_ids"]) == len(e["labels"]) <= 20 for e in examples)
    full, none = sft.load_examples(args.dataset, "test", toy_tok, max_length=512, limit=50)
    # every row longer than the window is either truncated or, when its prompt alone fills it, dropped
    filled = summary.dropped.get("prompt fills the window", [])
    assert none == 0 and truncated > 0 and truncated + len(filled) == sum(len(e["input_ids"]) > 20 for e in full)
    assert len(examples) + len(filled) == 50 == summary.read
    pairs, truncated = reward.load_pairs(str(toy / "preference"), "test", toy_tok, reward.REWARD, max_length=45, limit=50)
    assert all(len(p["first"]) <= 45 and len(p["second"]) <= 45 for p in pairs) and truncated > 0
