"""rounds.py's pieces against hand-worked cases; the driver itself runs end to end in test_pipeline.py
(demo.sh smoke ends with two tiny rounds)."""

import random
import sys

import pytest

import rounds as R
import toyworld as tw
from conftest import run

HARMFUL = next(r for r in tw.TRAIN_REQUESTS if r.is_harmful)
BENIGN = next(r for r in tw.TRAIN_REQUESTS if not r.is_harmful)


def answer(request, style):
    """One row of evaluate.py's responses.jsonl, as sample() reads it."""
    text = tw.canonical_response(request, style)
    j = tw.judge(request.text, text)
    return {"prompt": request.text, "response": text, "is_harmful": request.is_harmful, "is_safe": j.is_safe}


def test_annotate_pairs_every_distinct_answer_within_a_draw_and_keeps_the_last_draw_for_test():
    args = R.Args(answers_per_prompt=3, draws=2, seed=7)
    # draw 1: refuse, steps_2, refuse (one identical pair); draw 2: steps_4, refuse_alt_1, steps_1
    styles = ["refuse", "steps_2", "refuse", "steps_4", "refuse_alt_1", "steps_1"]
    answers = {HARMFUL.text: [answer(HARMFUL, s) for s in styles]}
    train, test, counts = R.annotate(answers, args, k=2)
    pairs = {(r["response_0"], r["response_1"]) for r in train}
    c = {s: tw.canonical_response(HARMFUL, s) for s in styles}
    assert pairs == {(c["refuse"], c["steps_2"]), (c["steps_2"], c["refuse"])}        # (0,1) and (1,2); (0,2) identical
    assert {(r["response_0"], r["response_1"]) for r in test} == {
        (c["steps_4"], c["refuse_alt_1"]), (c["steps_4"], c["steps_1"]), (c["refuse_alt_1"], c["steps_1"])}
    # by hand: refuse/steps_2 (twice), steps_4/refuse_alt_1 and refuse_alt_1/steps_1 have one safe answer,
    # steps_4/steps_1 none; the crowd's 2% label flips happen to miss all ten labels at this seed
    assert counts == {"train_pairs": 2, "test_pairs": 3, "identical_skipped": 1, "both_safe": 0, "one_safe": 4,
                      "both_unsafe": 1}
    for r in train + test:
        assert [r["is_response_0_safe"], r["is_response_1_safe"]] == [
            tw.judge(r["prompt"], r[f"response_{i}"]).is_safe for i in (0, 1)]
        if r["is_response_0_safe"] != r["is_response_1_safe"]:                     # the one labelled safe is safer
            assert r["safer_response_id"] == (0 if r["is_response_0_safe"] else 1)
    assert all(r["category"] == HARMFUL.category for r in train + test)
    assert set(train[0]) == {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                             "better_response_id", "safer_response_id", "category"}


def test_prompt_types_and_the_red_teams_split_by_hand():
    benign = [answer(BENIGN, "steps_3")] * 2
    solved = [answer(HARMFUL, "refuse"), answer(HARMFUL, "refuse_alt_2")]
    other = next(r for r in tw.TRAIN_REQUESTS if r.is_harmful and r.topic != HARMFUL.topic)
    unsolved = [answer(other, "refuse"), answer(other, "steps_1")]          # one unsafe answer of two
    answers = {BENIGN.text: benign, HARMFUL.text: solved, other.text: unsolved}
    assert R.prompt_types(answers, set()) == {"safety_unrelated": 1, "solved": 1, "unsolved": 1, "red_team": 0}
    assert R.prompt_types(answers, {other.text}) == {"safety_unrelated": 1, "solved": 1, "unsolved": 0, "red_team": 1}
    # red team: 5 tries, 3 succeed (one unsafe answer is enough); ceil(0.1 x 3) = 1 kept for evaluation
    pool = tw.RED_TEAM_REQUESTS[:5]
    tried = {r.text: [answer(r, "refuse"), answer(r, "steps_1" if i % 2 == 0 else "refuse_alt_1")]
             for i, r in enumerate(pool)}
    out = R.red_team_outcome(tried, 0.1, random.Random(0))
    assert out["succeeded"] == [pool[0].text, pool[2].text, pool[4].text]
    assert len(out["eval"]) == 1 and sorted(out["train"] + out["eval"]) == sorted(out["succeeded"])
    assert R.red_team_outcome({r.text: [answer(r, "refuse")] for r in pool}, 0.1, random.Random(0))["eval"] == []


def test_balanced_takes_the_same_number_from_every_round():
    rounds = [[{"r": 1, "i": i} for i in range(10)], [{"r": 2, "i": i} for i in range(4)], [{"r": 3, "i": i} for i in range(6)]]
    rows = R.balanced(rounds, 100, random.Random(0))
    assert [sum(row["r"] == k for row in rows) for k in (1, 2, 3)] == [4, 4, 4]
    rows = R.balanced(rounds, 3, random.Random(0))
    assert [sum(row["r"] == k for row in rows) for k in (1, 2, 3)] == [3, 3, 3]
    assert len({(row["r"], row["i"]) for row in rows}) == 9                     # drawn without replacement


def test_safety_types_count_the_crowds_labels():
    rows = [{"is_response_0_safe": a, "is_response_1_safe": b} for a, b in
            ((True, True), (True, False), (False, True), (False, False), (True, True))]
    assert R.safety_types(rows) == {"both_safe": 2, "one_safe": 2, "both_unsafe": 1}


@pytest.mark.parametrize("argv, message", [
    (["--runs", "nowhere"], "--runs nowhere: sft/config.json is missing"),
    (["--red_team_tries", "30"], "--red_team_tries 30 x 2 rounds exceeds the pool of 48 phrasings"),
    (["--rounds", "1"], "--rounds 1: must be a finite number >= 2"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    p = run([sys.executable, "rounds.py", *argv, "--output_dir", str(tmp_path / "o"), "--results_dir", str(tmp_path / "r")])
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and message in p.stderr, p.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_an_unrelated_output_folder_is_never_replaced(tmp_path):
    (tmp_path / "runs").mkdir()
    for name, marker in (("sft", "config.json"), ("reward", "config.json"), ("cost", "eval.json"),
                         ("ppo_lagrangian", "config.json")):
        (tmp_path / "runs" / name).mkdir()
        (tmp_path / "runs" / name / marker).write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    p = run([sys.executable, "rounds.py", "--runs", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "mine"),
             "--results_dir", str(tmp_path / "r")])
    assert p.returncode == 2 and "--output_dir" in p.stderr and "not a rounds.py folder" in p.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
