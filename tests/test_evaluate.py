"""evaluate.py and stats.py: the statistics against hand-worked examples, then every mode on tiny random models."""

import json
import math
import random
import shutil
import sys

import pytest

import evaluate as E
import stats as S
from plumbing import UserError
import toyworld
from conftest import run, torchrun, make_toy_checkpoints

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two busy cores: one thread per process is far faster

# ---- win rates, intervals, the arena table -----------------------------------------------------


def test_helpfulness_win_rate_counts_a_tie_as_half():
    w = S.helpfulness_win_rate([1, 2, 3, 3], [0, 2, 4, 1])   # win, tie, loss, win
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["rate"] == pytest.approx((2 + 0.5) / 4)        # 0.625
    assert w["lo"] < w["rate"] < w["hi"]


def test_harmlessness_win_rate_lower_cost_wins():
    assert S.harmlessness_win_rate([-1.0], [1.0])["rate"] == 1.0
    assert S.harmlessness_win_rate([1.0], [-1.0])["rate"] == 0.0
    w = S.harmlessness_win_rate([-1.0, 0.0, 2.0], [0.0, 0.0, 1.0])   # win, tie, loss
    assert (w["wins"], w["ties"], w["losses"]) == (1, 1, 1) and w["rate"] == pytest.approx(0.5)
    # B over A is one minus A over B
    a, b = [0.3, -1.0, 2.0, 0.0, 5.0], [0.1, 0.0, 2.0, -2.0, 1.0]
    assert S.harmlessness_win_rate(a, b)["rate"] + S.harmlessness_win_rate(b, a)["rate"] == pytest.approx(1.0)


def test_wilson_interval_by_hand():
    lo, hi = S.wilson_interval(8, 10)        # p = 0.8, z^2/n = 0.384: (0.992 -+ 0.3136) / 1.384
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = S.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)   # not empty at p = 0
    assert S.wilson_interval(0, 0) == (None, None)
    assert S.proportion([True, False, True, True])["rate"] == 0.75
    assert S.proportion([])["rate"] is None


def test_mean_interval_by_hand():
    m = S.mean_interval([1.0, 2.0, 3.0, 4.0])   # s = sqrt(5/3), half-width 1.96 s / 2
    assert m["mean"] == 2.5 and m["std"] == pytest.approx(math.sqrt(5 / 3))
    assert m["hi"] - m["mean"] == pytest.approx(S.Z95 * math.sqrt(5 / 3) / 2)


def test_safety_table_uses_c_le_0_as_safe():
    t = S.safety_table([-1.0, 0.0, 1.0, 2.0], [1.0, -1.0, 0.0, 3.0])
    assert t == {"a_safe_b_safe": 1, "a_safe_b_unsafe": 1, "a_unsafe_b_safe": 1, "a_unsafe_b_unsafe": 1}


# ---- Bradley-Terry Elo ---------------------------------------------------------------------------


def test_elo_two_players_three_to_one():
    ratings = S.bradley_terry_elo(2, [(0, 1, 1.0)] * 3 + [(0, 1, 0.0)])
    assert ratings[0] == 1000.0
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(3), abs=1e-6)   # 190.85
    # a tie is half a win each: 2 wins + 2 ties out of 4 is 3:1 as well
    ratings = S.bradley_terry_elo(2, [(0, 1, 1.0)] * 2 + [(0, 1, 0.5)] * 2)
    assert ratings[0] - ratings[1] == pytest.approx(190.85, abs=0.01)


def test_elo_three_players_transitive_mle_and_order_invariance():
    # strengths (4, 2, 1) fit these counts exactly: A-B 2:1, B-C 2:1, A-C 4:1
    games = ([(0, 1, 1.0)] * 2 + [(0, 1, 0.0)] + [(1, 2, 1.0)] * 2 + [(1, 2, 0.0)]
             + [(0, 2, 1.0)] * 4 + [(2, 0, 1.0)])
    ratings = S.bradley_terry_elo(3, games)
    assert ratings == pytest.approx([1000.0, 1000 - 400 * math.log10(2), 1000 - 800 * math.log10(2)], abs=1e-6)
    shuffled = games[:]
    random.Random(0).shuffle(shuffled)
    assert S.bradley_terry_elo(3, shuffled) == pytest.approx(ratings, abs=1e-9)
    # the anchor only shifts the scale
    anchored = S.bradley_terry_elo(3, games, anchor=2)
    assert [a - b for a, b in zip(anchored, ratings)] == pytest.approx([ratings[0] - ratings[2]] * 3, abs=1e-6)


def test_elo_symmetric_results_give_equal_ratings():
    games = [(i, j, s) for i in range(3) for j in range(i + 1, 3) for s in (1.0, 0.0, 0.5, 0.5)]
    assert S.bradley_terry_elo(3, games) == pytest.approx([1000.0] * 3, abs=1e-6)


def test_elo_perfect_record_needs_the_prior():
    games = [(0, 1, 1.0)] * 5
    with pytest.raises(ValueError):
        S.bradley_terry_elo(2, games)
    ratings = S.bradley_terry_elo(2, games, prior_ties=1.0)      # 5.5 : 0.5 -> 400 log10(11)
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(11), abs=1e-6)



def test_elo_intervals_by_hand():
    """Point estimate = the MLE of every game; the bootstrap resamples whole prompts, so prompts that
    all say the same thing give an interval of zero width, and mixed prompts a wider one around it."""
    groups = [[4 * g + i for i in range(4)] for g in range(5)]              # 5 prompts x 4 samples
    a, b = [1.0, 1.0, 1.0, -1.0] * 5, [0.0] * 20                          # a beats b 3 times of 4 on every prompt
    out = S.elo_intervals({"b": b, "a": a}, True, groups, "b", prior_ties=0.0, n_boot=50)
    assert out["b"] == {"elo": 1000.0, "lo": 1000.0, "hi": 1000.0}
    assert out["a"]["elo"] == out["a"]["lo"] == pytest.approx(out["a"]["hi"]) == pytest.approx(1000 + 400 * math.log10(3))
    # lower is better (harmlessness): the same games with the sign flipped
    assert S.elo_intervals({"b": b, "a": [-x for x in a]}, False, groups, "b", 0.0, n_boot=10)["a"]["elo"] == \
        pytest.approx(1000 + 400 * math.log10(3))
    # mixed prompts: a wins every game on 3 prompts and loses every game on 2 -> 12:8, 400 log10(1.5)
    a = [1.0] * 12 + [-1.0] * 8
    out = S.elo_intervals({"b": b, "a": a}, True, groups, "b", prior_ties=1.0, n_boot=200)
    flat = S.bradley_terry_elo(2, [(0, 1, s) for s in S.pairwise_scores(b, a, True)], prior_ties=1.0)
    assert out["a"]["elo"] == pytest.approx(flat[1]) == pytest.approx(1000 + 400 * math.log10(12.5 / 8.5))
    assert out["a"]["lo"] < out["a"]["elo"] < out["a"]["hi"]


def test_policy_tradeoff_of_a_run_started_from_a_run_is_iterated(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    base = {"kl_coeff": 0.1, "lambda_init": 1.0, "lambda_lr": 0.1}
    (tmp_path / "v1" / "args.json").write_text(json.dumps({**base, "actor_model_name_or_path": str(tmp_path / "sft")}))
    (tmp_path / "v2" / "args.json").write_text(json.dumps({**base, "actor_model_name_or_path": str(tmp_path / "v1")}))
    assert E.policy_tradeoff(str(tmp_path / "v1"))["kind"] == "ppo_lagrangian"
    assert E.policy_tradeoff(str(tmp_path / "v2"))["kind"] == "iterated"     # its optimum is around v1, not pi_sft


def test_policy_tradeoff_of_a_dpo_run_is_direct(tmp_path):
    # dpo.py's args.json: a "method", a beta and a reference, no lambda_init; not the SFT policy (beta = inf)
    (tmp_path / "safedpo").mkdir()
    (tmp_path / "safedpo" / "args.json").write_text(json.dumps(
        {"method": "safedpo", "beta": 0.1, "delta": 10.0, "model_name_or_path": str(tmp_path / "sft")}))
    t = E.policy_tradeoff(str(tmp_path / "safedpo"))
    assert t["kind"] == "direct" and math.isnan(t["nu"]) and math.isnan(t["beta"])
    assert E.policy_tradeoff(str(tmp_path / "sft")) == {"kind": "sft", "nu": 0.0, "beta": math.inf}  # no args.json


def test_majority_unsafe_counts_prompts_unsafe_in_more_than_half_their_samples():
    harmful = [r for r in toyworld.REQUESTS if r.is_harmful]
    a, b = [r for r in harmful if not r.held_out][:2]
    c = next(r for r in harmful if r.held_out)
    d = next(r for r in toyworld.REQUESTS if not r.is_harmful)
    unsafe, safe = "steps_2", "refuse"
    styles = {a: [unsafe, unsafe, safe, unsafe],   # 3 of 4 unsafe: a majority
              b: [unsafe, safe, safe, unsafe],     # 2 of 4: not more than half
              c: [unsafe] * 4,                     # 4 of 4 (held out)
              d: [safe] * 4}                       # benign: not counted
    pairs = [(toyworld.format_prompt(r.text), toyworld.canonical_response(r, s)) for r, ss in styles.items() for s in ss]
    pairs = pairs[1::2] + pairs[::2]  # the samples of a prompt need not be next to each other
    prompts, responses = [p for p, _ in pairs], [y for _, y in pairs]
    m = E.majority_unsafe(prompts, responses)
    assert (m["rate"], m["k"], m["n"]) == (pytest.approx(2 / 3), 2, 3)  # a and c of a, b, c
    assert (m["lo"], m["hi"]) == S.wilson_interval(2, 3)
    held_out = E.majority_unsafe(prompts, responses, "held_out")
    assert (held_out["k"], held_out["n"]) == (1, 1)  # c alone
    o = E.oracle_summary(prompts, responses)
    assert o["all"]["majority_unsafe"] == m and o["held_out"]["majority_unsafe"] == held_out
    assert (o["all"]["unsafe_rate"]["k"], o["all"]["unsafe_rate"]["n"]) == (9, 12)  # per sample: 3 + 2 + 4 of 12
    assert E.majority_unsafe(prompts[:0], responses[:0])["rate"] is None  # no harmful prompt

# ---- small helpers -------------------------------------------------------------------------------


def test_parse_named_paths_and_domination():
    assert E.parse_named_paths(["sft=runs/sft", "a=b=c"], "--policies") == [("sft", "runs/sft"), ("a", "b=c")]
    for bad in (["runs/sft"], ["=runs/sft"], ["sft="], ["a=x", "a=y"]):
        with pytest.raises(UserError):
            E.parse_named_paths(bad, "--policies")
    doms = S.dominated_by({"sft": (1.0, 0.5), "lag": (1.2, 0.0), "nu": (0.5, 0.0), "tie": (1.2, 0.0)})
    assert doms == {"sft": ["lag", "tie"], "lag": [], "nu": ["lag", "tie"], "tie": []}


# ---- every mode on tiny random-init checkpoints and toy data -------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy data; random-init tiny SFT / reward / cost checkpoints; a short real PPO-Lagrangian run (its
    metrics.jsonl and args.json); a fixed-nu 'run' with the SFT weights; a mixed 16-prompt file."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_toy_checkpoints(root)
    shutil.copytree(root / "sft", root / "nu_2")   # same weights as the SFT: paired sampling -> same answers
    (root / "nu_2" / "args.json").write_text(json.dumps({"lambda_init": 2.0, "lambda_lr": 0.0, "kl_coeff": 0.1,
                                                         "threshold": -0.4}))
    p = run([sys.executable, "ppo_lagrangian.py", "--actor_model_name_or_path", root / "sft",
             "--reward_model_name_or_path", root / "reward", "--cost_model_name_or_path", root / "cost",
             "--dataset", data / "prompts", "--limit", 8, "--per_device_prompt_batch_size", 4,
             "--per_device_train_batch_size", 4, "--epochs", 1, "--max_length", 40, "--sample_every", 0,
             "--output_dir", root / "ppo", "--device", "cpu", "--threshold", -1.0], env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (data / "eval" / "prompts.jsonl").read_text().splitlines()]
    mixed = [r for harmful in (False, True) for held in (False, True)   # 16 prompts: 4 of each kind
             for r in [r for r in rows if r["is_harmful"] == harmful and r["held_out"] == held][:4]]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return root


def evaluate_cmd(toy, out, *extra, policies=("sft", "ppo", "nu_2")):
    return [sys.executable, "evaluate.py", "--policies", *[f"{n}={toy / n}" for n in policies],
            "--reward_model", toy / "reward", "--cost_model", toy / "cost", "--prompts", toy / "prompts.jsonl",
            "--preference_dataset", toy / "toy" / "preference", "--preference_limit", 24, "--max_new_tokens", 16,
            "--batch_size", 8, "--output_dir", out, *extra]


def read_responses(out):
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


def test_all_modes_end_to_end(toy, tmp_path):
    out = tmp_path / "results"
    p = run(evaluate_cmd(toy, out), env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert set(r["modes"]) == set(E.MODES)
    assert r["n_prompts"] == 16
    for png in ("scatter.png", "histograms.png", "frontier.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    md = (out / "results.md").read_text()
    for title in ("Policies", "Preference models (Table 1)", "Arena", "Bradley-Terry Elo", "Analytic KL",
                  "Training runs (last step"):
        assert title in md, title
    assert p.stdout.rstrip().splitlines()[-1].startswith("wrote results.md")
    assert [line for line in p.stdout.splitlines() if line.startswith("## ")][-1].startswith("## Policies")
    # model-based: sane values
    for name in ("sft", "ppo", "nu_2"):
        s = r["learned"][name]
        assert s["reward"]["n"] == s["cost"]["n"] == 16
        assert 0 <= s["unsafe_by_cost"]["rate"] <= 1 and s["reward"]["lo"] <= s["reward"]["mean"] <= s["reward"]["hi"]
    # arena: every pair once (A = the later policy), rates in [0, 1]; nu_2 has the SFT's weights and the
    # same sampling seed, so every comparison with the SFT is a tie
    assert [(a["a"], a["b"]) for a in r["arena"]] == [("ppo", "sft"), ("nu_2", "sft"), ("nu_2", "ppo")]
    tie = r["arena"][1]
    assert tie["helpfulness"]["ties"] == tie["harmlessness"]["ties"] == 16 and tie["helpfulness"]["rate"] == 0.5
    assert tie["oracle_helpfulness"]["ties"] == tie["oracle_harmlessness"]["ties"] == 16
    # the same games judged by the oracle, recomputed from the saved responses
    by = {(row["policy"], row["prompt"]): toyworld.judge(row["prompt"], row["response"]) for row in read_responses(out)}
    prompts = [row["prompt"] for row in read_responses(out) if row["policy"] == "sft"]
    wins = sum((by["ppo", q].helpfulness > by["sft", q].helpfulness) + 0.5 * (by["ppo", q].helpfulness == by["sft", q].helpfulness)
               for q in prompts)
    assert r["arena"][0]["oracle_helpfulness"]["rate"] == pytest.approx(wins / 16)
    assert "Arena judged by the oracle" in md
    assert all(0 <= a[k]["rate"] <= 1 for a in r["arena"] for k in ("helpfulness", "harmlessness"))
    assert all(sum(a["safety_table"].values()) == 16 for a in r["arena"])
    assert r["elo"]["helpfulness"]["sft"] == 1000.0
    assert r["elo"]["helpfulness"]["nu_2"] == pytest.approx(1000.0, abs=1e-6)
    # figure 5a/5b with intervals, by both judges: nu_2 ties the SFT on every prompt, so 1000 with no width
    for judge in ("models", "oracle"):
        e = r["elo_ci"][judge]["all"]["harmlessness"]["nu_2"]
        assert e["elo"] == pytest.approx(1000.0, abs=1e-6) and e["hi"] - e["lo"] == pytest.approx(0.0, abs=1e-6)
    h = {n: [by[n, q].helpfulness for q in prompts] for n in ("sft", "ppo", "nu_2")}   # recomputed from responses.jsonl
    games = [(i, j, x) for i, a in enumerate(h) for j, b in enumerate(h) if i < j
             for x in S.pairwise_scores(h[a], h[b], True)]
    assert r["elo_ci"]["oracle"]["all"]["helpfulness"]["ppo"]["elo"] == pytest.approx(
        S.bradley_terry_elo(3, games, prior_ties=1.0)[1], abs=1e-4)
    assert set(r["elo_ci"]["oracle"]) <= {"all", "harmful", "benign"} and "Elo judged by the oracle" in md
    # preference metrics (Table 1)
    pref = r["preference"]
    assert pref["reward"]["n_pairs"] == pref["cost"]["n_pairs"] == 24
    assert 0 <= pref["reward"]["accuracy"] <= 1 and 0 <= pref["cost"]["accuracy_sign"] <= 1
    assert 0.5 < pref["bayes_ceiling"]["helpfulness"] < 1
    # the KL optimum: which trade-off each policy was trained with
    kinds = {n: (o["kind"], o["nu"], o["beta"]) for n, o in r["kl_optimum"].items()}
    # (the Lagrangian form's actor sees (R - nu C)/(1 + nu) - beta k: beta (1 + nu) on the scale of R - nu C)
    assert kinds["sft"] == ("sft", 0.0, "inf") and kinds["nu_2"] == ("fixed_nu", 2.0, pytest.approx(0.1 * 3))
    ppo_log = [json.loads(line) for line in (toy / "ppo" / "metrics.jsonl").read_text().splitlines()]
    ppo_args = json.loads((toy / "ppo" / "args.json").read_text())
    final_lambda = ppo_log[-1]["lagrangian/lambda"]
    assert kinds["ppo"] == ("ppo_lagrangian", final_lambda, pytest.approx(ppo_args["kl_coeff"] * (1 + final_lambda)))
    assert r["training"]["ppo"]["steps"] == len(ppo_log) and r["training"]["ppo"]["threshold"] == ppo_args["threshold"]
    # responses.jsonl: every (policy, prompt) once, its scores equal to the summaries
    rows = read_responses(out)
    assert len(rows) == 3 * 16
    sft_costs = [row["cost"] for row in rows if row["policy"] == "sft"]
    assert S.mean_interval(sft_costs)["mean"] == pytest.approx(r["learned"]["sft"]["cost"]["mean"])


def test_oracle_numbers_recomputed_from_responses(toy, tmp_path):
    out = tmp_path / "oracle"
    # the oracle needs no reward or cost model: point them at nothing to prove it
    p = run(evaluate_cmd(toy, out, "--modes", "oracle", "--reward_model", tmp_path / "none",
                         "--cost_model", tmp_path / "none", policies=("sft", "ppo")), env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["modes"] == ["oracle"] and "learned" not in r and "arena" not in r
    assert (out / "frontier.png").is_file() and not (out / "scatter.png").exists()
    rows = read_responses(out)
    for name in ("sft", "ppo"):
        mine = [row for row in rows if row["policy"] == name]
        assert len(mine) == 16
        for subset, keep in (("all", lambda row: True), ("held_out", lambda row: row["held_out"])):
            judged = [(row, toyworld.judge(row["prompt"], row["response"])) for row in mine if keep(row)]
            harmful = [j for row, j in judged if toyworld.find_request(row["prompt"]).is_harmful]
            benign = [j for row, j in judged if not toyworld.find_request(row["prompt"]).is_harmful]
            o = r["oracle"][name][subset]
            assert o["unsafe_rate"]["rate"] == pytest.approx(sum(not j.is_safe for j in harmful) / len(harmful))
            assert o["helpfulness_benign"]["mean"] == pytest.approx(sum(j.helpfulness for j in benign) / len(benign))
            assert o["over_refusal_rate"]["rate"] == pytest.approx(sum(j.refused for j in benign) / len(benign))
            assert 0 <= o["unsafe_rate"]["lo"] <= o["unsafe_rate"]["rate"] <= o["unsafe_rate"]["hi"] <= 1
            per_prompt = {}
            for row, j in judged:
                if toyworld.find_request(row["prompt"]).is_harmful:
                    per_prompt.setdefault(row["prompt"], []).append(not j.is_safe)
            assert (o["majority_unsafe"]["k"], o["majority_unsafe"]["n"]) == (
                sum(2 * sum(u) > len(u) for u in per_prompt.values()), len(per_prompt))


def test_preference_and_curves_only(toy, tmp_path):
    out = tmp_path / "pc"
    p = run(evaluate_cmd(toy, out, "--modes", "preference", "curves", "--training_logs",
                         f"lag={toy / 'ppo' / 'metrics.jsonl'}", "folder=" + str(toy / "ppo")), env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert set(r["modes"]) == {"preference", "curves"} and set(r["training"]) == {"lag", "folder"}
    assert sorted(r["files"]) == ["results.json", "results.md", "sqrt_kl.png", "training_curves.png"]
    assert not (out / "responses.jsonl").exists()
    # a second run replaces the folder as a whole
    p = run(evaluate_cmd(toy, out, "--modes", "curves", "--training_logs", f"lag={toy / 'ppo'}"), env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    assert set(json.loads((out / "results.json").read_text())["training"]) == {"lag"}


def test_two_ranks_generate_and_oracle(toy, tmp_path):
    out = tmp_path / "dist"
    cmd = evaluate_cmd(toy, out, "--modes", "generate", "oracle", "--limit", 13, "--batch_size", 4,
                       policies=("sft", "nu_2"))[1:]
    p = torchrun(2, cmd, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    rows = read_responses(out)
    assert r["n_prompts"] == 13 and len(rows) == 2 * 13
    for name in ("sft", "nu_2"):
        prompts = [row["prompt"] for row in rows if row["policy"] == name]
        assert len(set(prompts)) == 13                      # no duplicates from the lockstep padding
        assert r["learned"][name]["reward"]["n"] == 13


def test_bad_input_gives_one_line(toy, tmp_path):
    p = run(evaluate_cmd(toy, tmp_path / "x", policies=("sft",))[:3] + ["sft" + str(toy / "sft")])
    assert p.returncode == 2 and p.stderr.strip() == f"error: --policies: 'sft{toy / 'sft'}' is not NAME=PATH " \
                                                      "(e.g. sft=runs/sft)"
    cmd = evaluate_cmd(toy, tmp_path / "x")
    cmd[cmd.index("--cost_model") + 1] = tmp_path / "nope"
    p = run(cmd)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "run cost.py first" in p.stderr
    assert not (tmp_path / "x").exists()


def in_process_error(toy, tmp_path, **overrides) -> str:
    args = E.Args(policies=[f"sft={toy / 'sft'}"], reward_model=str(toy / "reward"), cost_model=str(toy / "cost"),
                  prompts=str(toy / "prompts.jsonl"), preference_dataset=str(toy / "toy" / "preference"),
                  output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError) as e:
        E.main(E.Args(**{**args.__dict__, **overrides}))
    return str(e.value)


def test_bad_input_messages(toy, tmp_path):
    assert "run sft.py first" in in_process_error(toy, tmp_path, policies=[f"sft={tmp_path / 'no_sft'}"])
    assert "run ppo_lagrangian.py first" in in_process_error(toy, tmp_path, policies=[f"lag={tmp_path / 'no_lag'}"])
    assert "run reward.py first" in in_process_error(toy, tmp_path, reward_model=str(tmp_path / "no_reward"))
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in in_process_error(toy, tmp_path, prompts=str(tmp_path / "empty.jsonl"))
    assert "two or more" in in_process_error(toy, tmp_path, modes=["arena"])
    (tmp_path / "real.jsonl").write_text('{"prompt": "what is the capital of france?"}\n')
    assert "toy-world requests" in in_process_error(toy, tmp_path, modes=["oracle"], prompts=str(tmp_path / "real.jsonl"))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    assert "holds files this project did not write (notes.txt)" in in_process_error(toy, tmp_path, output_dir=str(tmp_path / "keep"))
    assert not (tmp_path / "out").exists()


def test_help_documents_every_mode():
    p = run([sys.executable, "evaluate.py", "--help"])
    assert p.returncode == 0
    for word in (*E.MODES, "--policies", "--prompts", "--preference_dataset", "--training_logs", "--oracle",
                 "--arena_baseline", "--temperature", "--max_new_tokens", "--batch_size", "--seed", "--limit"):
        assert word in p.stdout, word


def test_sqrt_kl_fit_against_a_hand_line():
    """Reward exactly 2 + 3 sqrt(KL) (window 1: no smoothing) -> slope 3, R^2 1; a constant cost has no R^2."""
    kl = [0.0, 0.25, 1.0, 2.25, 4.0]
    log = {"kl": kl, "reward": [2 + 3 * k ** 0.5 for k in kl], "cost": [1.0] * 5}
    fit = S.sqrt_kl_fit(log, window=1)
    assert fit["reward_slope"] == pytest.approx(3.0) and fit["reward_r2"] == pytest.approx(1.0)
    assert fit["cost_slope"] == pytest.approx(0.0) and fit["cost_r2"] is None
    assert S.running_mean([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_seconds_per_rl_step_share_a_rollouts_time_and_memory_is_the_peak(tmp_path):
    """Two rollouts of two rl_steps each: generation and scoring repeat in both records of a rollout,
    training counts from the rollout's first update; the first record of a rollout carries the
    first-pass check. Rollout 1: (0.6 + 0.2 + 0.8) / 2 = 0.8 s per step; rollout 2: (0.2 + 0.2 + 0.6) / 2 = 0.5;
    a lone rollout of one step: 0.9. Median of 0.8, 0.5, 0.9: 0.8."""
    times = [(0.6, 0.2, 0.3, True), (0.6, 0.2, 0.8, False), (0.2, 0.2, 0.3, True), (0.2, 0.2, 0.6, False),
             (0.5, 0.1, 0.3, True)]
    rows = []
    for step, (g, sc, tr, first) in enumerate(times, 1):
        row = {"step": step, "lagrangian/lambda": 1.0, "lagrangian/episode_cost": 0.0, "objective/reward": 0.0,
               "objective/cost": 0.0, "objective/kl": 0.0, "time/generation": g, "time/scoring": sc,
               "time/training": tr, "memory/peak_gib": [1.5, 2.5, 2.0, 1.0, 0.5][step - 1]}
        if first:
            row["policy/first_pass_logratio_max"] = 0.0
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = E.read_training_log(tmp_path / "metrics.jsonl")
    assert log["step_time"] == pytest.approx(0.8) and log["peak_memory"] == 2.5
    assert math.isnan(E.step_seconds([{"step": 1}]))
