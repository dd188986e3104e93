"""The one-command pipeline (demo.sh) end to end with tiny settings: every stage runs, in order,
through the same scripts `make demo` uses, and the evaluation covers every policy."""

import json
import sys

from conftest import run


def test_demo_pipeline_smoke(tmp_path):
    p = run(["bash", "demo.sh", "smoke", tmp_path], timeout=600, env={"PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    for stage in ("1/5 SFT", "2/5 reward", "3/5 cost", "4/5 PPO-Lagrangian", "4/5 baseline: plain PPO", "5/5 evaluation"):
        assert stage in p.stdout
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results["policies"]) == ["sft", "ppo", "nu_1", "ppo_lagrangian"]
    for png in ("frontier.png", "training_curves.png", "scatter.png", "histograms.png"):
        assert (tmp_path / "results" / png).stat().st_size > 0


def test_demo_pipeline_stops_at_the_first_failing_stage(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sft").write_text("not a folder")     # sft.py cannot write its output there
    p = run(["bash", "demo.sh", "smoke", tmp_path], timeout=300, env={"PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "1/5 SFT" in p.stdout and "2/5 reward" not in p.stdout
