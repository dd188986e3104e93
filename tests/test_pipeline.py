"""The one-command pipeline (demo.sh) end to end with tiny settings: every stage runs, in order,
through the same scripts `make demo` uses, and the evaluation covers every policy."""

import json
import sys

import toyworld

from conftest import ROOT, run


def test_demo_pipeline_smoke(tmp_path):
    p = run(["bash", "demo.sh", "smoke", tmp_path], timeout=600, env={"PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    for stage in ("1/5 SFT", "2/5 reward", "3/5 cost", "4/5 PPO-Lagrangian", "4/5 baseline: plain PPO", "5/5 evaluation"):
        assert stage in p.stdout
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results["policies"]) == ["sft", "ppo", "nu_1", "ppo_lagrangian", "rloo_lagrangian", "dpo", "safedpo_d10",
                                         "mocan", "sacpo_l2"]
    # the successors (dpo.py) beside the rest, with every training command's wall time
    times = [json.loads(line)["name"] for line in (tmp_path / "runs" / "train_times.jsonl").read_text().splitlines()]
    assert times == ["sft", "reward", "cost", "ppo_lagrangian", "ppo", "nu_1", "rloo_lagrangian", "rloo", "dpo",
                     "safedpo_d10", "mocan", "sacpo_l2"]
    table = (tmp_path / "results" / "successors.md").read_text()
    assert "SafeDPO Δ=10" in table and "SACPO β/λ=0.05" in table and "n/a" not in table
    assert (tmp_path / "results" / "successors_frontier.png").stat().st_size > 1000
    for png in ("frontier.png", "training_curves.png", "scatter.png", "histograms.png"):
        assert (tmp_path / "results" / png).stat().st_size > 0
    # the critic-free stage next to PPO-Lagrangian: every policy measured by the oracle, both lambda curves
    side = json.loads((tmp_path / "results-rloo" / "results.json").read_text())
    assert list(side["oracle"]) == ["sft", "ppo", "ppo_lagrangian", "rloo", "rloo_lagrangian"]
    assert set(side["training"]) == {"ppo", "ppo_lagrangian", "rloo", "rloo_lagrangian"}
    assert (tmp_path / "results-rloo" / "curves" / "training_curves.png").stat().st_size > 1000
    table = (tmp_path / "results-rloo" / "rloo_side_by_side.md").read_text()
    assert "| rloo_lagrangian | 4 |" in table and "| ppo_lagrangian | 6 |" in table
    # the rounds (rounds.py, two tiny ones): every figure, and the red team only ever draws from its pool
    rounds = json.loads((tmp_path / "results-rounds" / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2] and list(rounds["unsafe"]) == ["sft", "v1", "v2"]
    for png in ("rounds.png", "rounds_scatter.png"):
        assert (tmp_path / "results-rounds" / png).stat().st_size > 1000
    assert set(rounds["elo"]) == {"models", "oracle"} and "Figure 5a/5b" in (tmp_path / "results-rounds" / "rounds.md").read_text()
    pool = {r.text for r in toyworld.RED_TEAM_REQUESTS}
    tried = [json.loads(line)["prompt"] for line in
             (tmp_path / "runs" / "rounds" / "round2" / "red_team" / "prompts.jsonl").read_text().splitlines()]
    assert len(tried) == 8 and set(tried) <= pool
    red = rounds["rounds"][1]["red_team"]
    round_prompts = [json.loads(line)["prompt"] for line in
                     (tmp_path / "runs" / "rounds" / "round2" / "data" / "prompts" / "train.jsonl").read_text().splitlines()]
    assert set(round_prompts) - {r.text for r in toyworld.TRAIN_REQUESTS} == set(red["to_prompts"]) <= set(tried)
    assert not set(red["to_eval"]) & set(round_prompts)                  # the red-team evaluation set is never trained on
    evaluation = (ROOT / "data" / "toy" / "eval" / "prompts.jsonl").read_text().splitlines()
    assert not pool & {json.loads(line)["prompt"] for line in evaluation}   # nor in the evaluation prompts


def test_demo_pipeline_stops_at_the_first_failing_stage(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sft").write_text("not a folder")     # sft.py cannot write its output there
    p = run(["bash", "demo.sh", "smoke", tmp_path], timeout=300, env={"PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "1/5 SFT" in p.stdout and "2/5 reward" not in p.stdout
