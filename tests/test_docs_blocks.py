"""tools/docs_blocks.py: each block demo.sh writes into README.md and docs/, rendered from small hand-written
results into a temporary copy, checked against the text written out here; the hand-written text around
the markers is kept byte for byte, missing markers are refused, and a second run changes nothing."""

import json
import sys

import pytest

from tools import docs_blocks
from tools.docs_blocks import replace_between_markers
from conftest import run

README = """# A project

Hand-written, kept as is: <!-- not a marker --> ü

<!-- headline:start -->
| stale headline |
<!-- headline:end -->

Between the tables.

<!-- rloo:start -->
| stale rloo |
<!-- rloo:end -->
<!-- rounds:start -->
| stale rounds |
<!-- rounds:end -->
<!-- successors:start -->
| stale successors |
<!-- successors:end -->
The end, without a line break."""
RLOO_PAGE = "# RLOO\n\nintro\n\n<!-- rloo:start -->\nstale\n<!-- rloo:end -->\n\nafterword\n"
ABLATIONS_PAGE = "# Ablations\n\n<!-- ablations:start -->\nstale\n<!-- ablations:end -->\nafterword\n"
ROUNDS_PAGE = "# Rounds\n\n<!-- rounds:start -->\n<!-- rounds:end -->\n\nafterword\n"
RESULTS_MD = """# Evaluation

## Policies (2 prompts x 1 sample, temperature 1, 95% intervals)

| policy | unsafe on harmful |
|---|---|
| sft | – |

### A third level

text
"""


def oracle(unsafe, helpful, refusal):
    """An evaluate.py oracle entry (every prompt); each argument (value, lo, hi), or None: no such prompts."""
    def stat(key, v):
        return dict(zip((key, "lo", "hi"), v or (None, None, None)))
    return {"all": {"unsafe_rate": stat("rate", unsafe), "helpfulness_benign": stat("mean", helpful),
                    "over_refusal_rate": stat("rate", refusal)}}


def training(final_lambda, final_kl, step_time_s, peak_memory_gib):
    return {"final_lambda": final_lambda, "final_kl": final_kl, "step_time_s": step_time_s,
            "peak_memory_gib": peak_memory_gib}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root" / "docs").mkdir(parents=True)
    (tmp_path / "root" / "README.md").write_text(README)
    for name, text in (("rloo.md", RLOO_PAGE), ("ablations.md", ABLATIONS_PAGE), ("rounds.md", ROUNDS_PAGE)):
        (tmp_path / "root" / "docs" / name).write_text(text)
    return tmp_path / "root"


@pytest.fixture
def results(tmp_path):
    """evaluate.py's folder of the full run: five policies (nu_0.5 is not in the headline), three plots."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "results.md").write_text(RESULTS_MD)
    (folder / "results.json").write_text(json.dumps({"oracle": {
        "sft": oracle((0.4, 0.3, 0.5), (1.0, 0.75, 1.25), (0.125, 0.06, 0.25)),
        "ppo": oracle((0.9, 0.8, 0.95), (2.0, 1.5, 2.5), (0.0, 0.0, 0.01)),
        "nu_0.5": oracle((0.5, 0.25, 0.75), (1.5, 1.25, 1.75), (0.0, 0.0, 0.01)),
        "nu_1": oracle(None, (-0.5, -0.625, -0.375), (0.0, 0.0, 0.01)),
        "ppo_lagrangian": oracle((0.035, 0.01, 0.06), (1.75, 1.5, 2.0), (0.06, 0.03, 0.125))}}))
    for png in ("frontier.png", "scatter.png", "sqrt_kl.png"):
        (folder / png).write_bytes(png.encode())
    return folder


@pytest.fixture
def rloo_results(tmp_path):
    """evaluate.py's folder of the critic-free comparison, with the curves of both Lagrangian runs."""
    folder = tmp_path / "results-rloo"
    (folder / "curves").mkdir(parents=True)
    (folder / "curves" / "training_curves.png").write_bytes(b"curves")
    (folder / "results.json").write_text(json.dumps({
        "oracle": {"sft": oracle((0.4, 0.3, 0.5), (1.0, 0.75, 1.25), (0.125, 0.06, 0.25)),
                   "ppo": oracle((0.9, 0.8, 0.95), (2.0, 1.5, 2.5), (0.0, 0.0, 0.01)),
                   "ppo_lagrangian": oracle((0.035, 0.01, 0.06), (1.75, 1.5, 2.0), (0.06, 0.03, 0.125)),
                   "rloo": oracle(None, (2.0, 1.5, 2.5), (0.0, 0.0, 0.01)),
                   "rloo_lagrangian": oracle((0.05, 0.025, 0.1), (0.75, 0.5, 1.0), (0.25, 0.125, 0.375))},
        "training": {"ppo": training(0.0, 4.06, 0.5, 0.64), "ppo_lagrangian": training(0.156, 5.25, 0.5, 0.67),
                     "rloo": training(0.0, 5.5, 0.25, 0.5), "rloo_lagrangian": training(1.0, 2.12, 0.25, 0.5)}}))
    return folder


@pytest.fixture
def rounds_results(tmp_path):
    folder = tmp_path / "results-rounds"
    folder.mkdir()
    (folder / "rounds.md").write_text("# Iterated Safe RLHF on the toy world (rounds.py)\n\nRounds: 2.\n\n"
                                      "### Figure 3a\n\n| round |\n|---|\n| 1 |\n")
    (folder / "rounds_headline.md").write_text("| policy | unsafe |\n|---|---|\n| sft | – |\n| v1 | – |\n")
    for png in ("rounds.png", "rounds_scatter.png"):
        (folder / png).write_bytes(png.encode())
    return folder


def readme_with(headline="| stale headline |", rloo="| stale rloo |", rounds="| stale rounds |",
                successors="| stale successors |"):
    """README above with the given blocks: everything else is the hand-written text, unchanged."""
    return (README.replace("| stale headline |", headline).replace("| stale rloo |", rloo)
            .replace("| stale rounds |", rounds).replace("| stale successors |", successors))


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_replace_between_markers_keeps_the_text_around():
    text = "before é\r\n<!-- x:start -->old\n\n<!-- x:end -->after <!-- y:start -->\nkeep\n<!-- y:end -->"
    new = replace_between_markers(text, "x", "| new |")
    assert new == "before é\r\n<!-- x:start -->\n| new |\n<!-- x:end -->after <!-- y:start -->\nkeep\n<!-- y:end -->"
    assert replace_between_markers(new, "x", "| new |") == new
    assert replace_between_markers(text, "y", "") == ("before é\r\n<!-- x:start -->old\n\n<!-- x:end -->after "
                                                        "<!-- y:start -->\n\n<!-- y:end -->")
    assert replace_between_markers(text, "x", r"\1 \g<0>") == text.replace("old\n\n", "\n\\1 \\g<0>\n")  # taken as is


@pytest.mark.parametrize("text", ["no markers", "<!-- x:start -->\nonly the start", "only the end\n<!-- x:end -->",
                                  "<!-- x:end --> the wrong way round <!-- x:start -->",
                                  "<!-- xy:start --><!-- xy:end -->"])
def test_missing_markers_are_refused(text):
    with pytest.raises(ValueError, match="no <!-- x:start --> ... <!-- x:end --> markers"):
        replace_between_markers(text, "x", "block")


def test_results_block(root, results, capsys):
    docs_blocks.main(["results", str(results), "--root", str(root)])
    assert (root / "README.md").read_text() == readme_with(headline="""\
| policy | unsafe on harmful | benign helpfulness | benign over-refusal |
|---|---|---|---|
| sft | 0.400 [0.300, 0.500] | 1.000 [0.750, 1.250] | 0.125 [0.060, 0.250] |
| ppo | 0.900 [0.800, 0.950] | 2.000 [1.500, 2.500] | 0.000 [0.000, 0.010] |
| nu_1 | – | -0.500 [-0.625, -0.375] | 0.000 [0.000, 0.010] |
| ppo_lagrangian | 0.035 [0.010, 0.060] | 1.750 [1.500, 2.000] | 0.060 [0.030, 0.125] |""")
    assert (root / "docs" / "results.md").read_text() == """\
# Results on the toy world

Every table here is written by `make demo` (`demo.sh`, then `evaluate.py`); the
headline rows are in README.md, the plots next to this file, the metric names in docs/metrics.md.

### Evaluation of the `make demo` run

<!-- results:start -->
### Evaluation

#### Policies (2 prompts x 1 sample, temperature 1, 95% intervals)

| policy | unsafe on harmful |
|---|---|
| sft | – |

##### A third level

text
<!-- results:end -->
"""
    for png in ("frontier.png", "scatter.png", "sqrt_kl.png"):
        assert (root / "docs" / png).read_bytes() == png.encode()
    assert not (root / "docs" / "histograms.png").exists()
    assert capsys.readouterr().out == "docs/results.md and README.md's headline table updated; plots in docs/\n"


ABLATIONS_BLOCK = """<!-- ablations:start -->
### Evaluation

### Policies (2 prompts x 1 sample, temperature 1, 95% intervals)

| policy | unsafe on harmful |
|---|---|
| sft | – |

### A third level

text
<!-- ablations:end -->
"""


def test_ablations_block(root, results, capsys):
    docs_blocks.main(["ablations", str(results), "--root", str(root)])
    assert (root / "docs" / "ablations.md").read_text() == "# Ablations\n\n" + ABLATIONS_BLOCK + "afterword\n"
    assert capsys.readouterr().out == "docs/ablations.md: the tables between its markers updated\n"
    (root / "docs" / "ablations.md").unlink()  # a missing page is created from a template
    docs_blocks.main(["ablations", str(results), "--root", str(root)])
    assert (root / "docs" / "ablations.md").read_text() == (
        "# Figure 6a on the toy world: what the decoupling and the cost model's classifier buy\n\n"
        "Written by `make demo` (`demo.sh ablations`, on the full run's SFT, reward and cost models).\n\n"
        + ABLATIONS_BLOCK)


RLOO_TABLE = """\
| policy | models | unsafe on harmful | benign helpfulness | benign over-refusal | target met | final lambda | KL \
| s per rl_step | peak memory GiB |
|---|---|---|---|---|---|---|---|---|---|
| sft | 1 | 0.400 [0.300, 0.500] | 1.000 [0.750, 1.250] | 0.125 [0.060, 0.250] | no | – | – | – | – |
| ppo | 6 | 0.900 [0.800, 0.950] | 2.000 [1.500, 2.500] | 0.000 [0.000, 0.010] | no | 0.000 | 4.06 | 0.500 | 0.64 |
| ppo_lagrangian | 6 | 0.035 [0.010, 0.060] | 1.750 [1.500, 2.000] | 0.060 [0.030, 0.125] | yes | 0.156 | 5.25 | 0.500 | 0.67 |
| rloo | 4 | – | 2.000 [1.500, 2.500] | 0.000 [0.000, 0.010] | no | 0.000 | 5.50 | 0.250 | 0.50 |
| rloo_lagrangian | 4 | 0.050 [0.025, 0.100] | 0.750 [0.500, 1.000] | 0.250 [0.125, 0.375] | no | 1.000 | 2.12 | 0.250 | 0.50 |"""


def test_rloo_block(root, rloo_results, capsys):
    docs_blocks.main(["rloo", str(rloo_results), "--profile", "full", "--root", str(root)])
    assert (rloo_results / "rloo_side_by_side.md").read_text() == RLOO_TABLE + "\n"
    assert (root / "docs" / "rloo.md").read_text() == RLOO_PAGE.replace("stale", RLOO_TABLE)
    assert (root / "README.md").read_text() == readme_with(rloo="""\
| policy | models | unsafe on harmful | benign helpfulness | benign over-refusal | s per rl_step |
|---|---|---|---|---|---|
| sft | 1 | 0.400 [0.300, 0.500] | 1.000 [0.750, 1.250] | 0.125 [0.060, 0.250] | – |
| ppo | 6 | 0.900 [0.800, 0.950] | 2.000 [1.500, 2.500] | 0.000 [0.000, 0.010] | 0.500 |
| ppo_lagrangian | 6 | 0.035 [0.010, 0.060] | 1.750 [1.500, 2.000] | 0.060 [0.030, 0.125] | 0.500 |
| rloo | 4 | – | 2.000 [1.500, 2.500] | 0.000 [0.000, 0.010] | 0.250 |
| rloo_lagrangian | 4 | 0.050 [0.025, 0.100] | 0.750 [0.500, 1.000] | 0.250 [0.125, 0.375] | 0.250 |""")
    assert (root / "docs" / "rloo_curves.png").read_bytes() == b"curves"
    assert capsys.readouterr().out == (RLOO_TABLE + "\n"
                                       "docs/rloo.md's and README.md's tables and docs/rloo_curves.png updated\n")


def test_rloo_block_of_another_profile_leaves_the_docs_alone(root, rloo_results, capsys):
    before = files(root)
    docs_blocks.main(["rloo", str(rloo_results), "--profile", "quick", "--root", str(root)])
    assert files(root) == before
    assert (rloo_results / "rloo_side_by_side.md").read_text() == RLOO_TABLE + "\n"
    assert capsys.readouterr().out == RLOO_TABLE + "\n"


def test_rounds_block(root, rounds_results, capsys):
    docs_blocks.main(["rounds", str(rounds_results), "--root", str(root)])
    block = "<!-- rounds:start -->\nRounds: 2.\n\n### Figure 3a\n\n| round |\n|---|\n| 1 |\n<!-- rounds:end -->\n"
    assert (root / "docs" / "rounds.md").read_text() == "# Rounds\n\n" + block + "\nafterword\n"
    assert (root / "README.md").read_text() == readme_with(
        rounds="| policy | unsafe |\n|---|---|\n| sft | – |\n| v1 | – |")  # the headline's last line break dropped
    for png in ("rounds.png", "rounds_scatter.png"):
        assert (root / "docs" / png).read_bytes() == png.encode()
    assert capsys.readouterr().out == ("docs/rounds.md and README.md's rounds table updated; docs/rounds.png, "
                                       "docs/rounds_scatter.png\n")
    (root / "docs" / "rounds.md").unlink()  # a missing page is created from a template
    docs_blocks.main(["rounds", str(rounds_results), "--root", str(root)])
    assert (root / "docs" / "rounds.md").read_text() == "# Iterated Safe RLHF\n\n" + block


def test_a_second_run_changes_nothing(root, results, rloo_results, rounds_results):
    commands = [["results", results], ["ablations", results], ["rloo", rloo_results, "--profile", "full"],
                ["rounds", rounds_results]]
    for command in commands:
        docs_blocks.main([str(c) for c in command] + ["--root", str(root)])
    first = files(root)
    for command in commands:
        docs_blocks.main([str(c) for c in command] + ["--root", str(root)])
    assert files(root) == first


def test_a_readme_without_the_markers_is_refused_and_nothing_written(root, results):
    (root / "README.md").write_text("# A README someone rewrote\n")
    before = files(root)
    p = run([sys.executable, "-m", "tools.docs_blocks", "results", results, "--root", root])
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"error: {root / 'README.md'}: no <!-- headline:start --> ... <!-- headline:end --> markers\n"
    assert files(root) == before


# ---- successors: Safe RLHF's successors (dpo.py) beside the Lagrangian runs ---------------------------


def successor(unsafe, helpful, refusal, majority, dominated_by):
    """An evaluate.py oracle entry with the unsafe-in-most-samples share and the dominating policies."""
    o = oracle(unsafe, helpful, refusal)
    o["all"]["majority_unsafe"] = dict(zip(("rate", "lo", "hi"), majority))
    return {**o, "dominated_by": dominated_by}


def successors_folder(tmp_path, name, oracles, times):
    """evaluate.py's folder (results.json only) and demo.sh's runs folder (train_times.jsonl only)."""
    results, runs = tmp_path / f"results-{name}", tmp_path / f"runs-{name}"
    results.mkdir(), runs.mkdir()
    (results / "results.json").write_text(json.dumps({"oracle": oracles}))
    (runs / "train_times.jsonl").write_text("".join(json.dumps({"name": n, "wall_s": t}) + "\n" for n, t in times))
    return results, runs


SUCCESSORS = {
    "sft": successor((0.5, 0.25, 0.75), (1.0, 0.75, 1.25), (0.125, 0.0, 0.25), (0.5, 0.25, 0.75), ["ppo_lagrangian"]),
    "nu_1": successor((0.25, 0.125, 0.5), (0.5, 0.25, 0.75), (0.5, 0.25, 0.75), (0.25, 0.0, 0.5), ["sft", "dpo"]),
    "ppo_lagrangian": successor((0.0625, 0.0, 0.125), (1.5, 1.25, 1.75), (0.0, 0.0, 0.25), (0.0, 0.0, 0.25), []),
    "rloo_lagrangian": successor((0.0, 0.0, 0.125), (0.5, 0.25, 0.75), (0.25, 0.0, 0.5), (0.0, 0.0, 0.25), []),
    "dpo": successor((0.75, 0.5, 1.0), (2.0, 1.75, 2.25), (0.0, 0.0, 0.25), (1.0, 0.75, 1.0), []),
    "safedpo_d10": successor((0.03125, 0.0, 0.0625), (1.25, 1.0, 1.5), (0.0, 0.0, 0.25), (0.0, 0.0, 0.25), []),
    "mocan": successor((0.125, 0.0, 0.25), (1.75, 1.5, 2.0), (0.0, 0.0, 0.25), (0.125, 0.0, 0.25), []),
    "sacpo_l4": successor((0.25, 0.0, 0.5), (1.0, 0.75, 1.25), (0.25, 0.0, 0.5), (0.375, 0.25, 0.5), ["mocan"]),
    "sacpo_l10": successor(None, (1.0, 0.75, 1.25), (0.25, 0.0, 0.5), (None, None, None), None),
}
# seconds; sft was run twice (the last line counts); no line for sacpo_l10
TRAIN_TIMES = [("sft", 600), ("reward", 120), ("cost", 180), ("sft", 300), ("nu_1", 900), ("ppo_lagrangian", 1200),
               ("rloo_lagrangian", 48), ("dpo", 240), ("safedpo_d10", 250), ("mocan", 400), ("sacpo_l4", 200)]
# own stage and the pipeline from SFT on, by hand: sft 300 (5.0 min); reward + cost 300 more for the RL runs and MoCAN;
# nu_1 900 -> 1500 s; ppo_lagrangian 1200 -> 1800; rloo 48 s -> 648 (10.8 min); dpo 240 -> 540; safedpo 250 (4.17 min)
# -> 550 (9.17); mocan 400 (6.67) -> 1000 (16.67); sacpo_l4 = dpo 240 + 200 = 440 (7.33) -> + sft = 740 (12.33)
SUCCESSORS_TABLE = """\
| method | unsafe on harmful | benign helpfulness | benign over-refusal | unsafe in most samples | dominated by \
| own training wall time | pipeline wall time from SFT on | models held in training |
|---|---|---|---|---|---|---|---|---|
| SFT | 0.500 [0.250, 0.750] | 1.000 [0.750, 1.250] | 0.125 [0.000, 0.250] | 0.500 [0.250, 0.750] \
| PPO-Lagrangian (Safe RLHF) | 5.0 min | 5.0 min | 1 |
| fixed ν=1 | 0.250 [0.125, 0.500] | 0.500 [0.250, 0.750] | 0.500 [0.250, 0.750] | 0.250 [0.000, 0.500] \
| SFT, DPO (helpfulness only) | 15.0 min | 25.0 min | 6 |
| PPO-Lagrangian (Safe RLHF) | 0.062 [0.000, 0.125] | 1.500 [1.250, 1.750] | 0.000 [0.000, 0.250] \
| 0.000 [0.000, 0.250] | none | 20.0 min | 30.0 min | 6 |
| RLOO-Lagrangian | 0.000 [0.000, 0.125] | 0.500 [0.250, 0.750] | 0.250 [0.000, 0.500] | 0.000 [0.000, 0.250] \
| none | 48 s | 10.8 min | 4 |
| DPO (helpfulness only) | 0.750 [0.500, 1.000] | 2.000 [1.750, 2.250] | 0.000 [0.000, 0.250] \
| 1.000 [0.750, 1.000] | none | 4.0 min | 9.0 min | 2 |
| SafeDPO Δ=10 | 0.031 [0.000, 0.062] | 1.250 [1.000, 1.500] | 0.000 [0.000, 0.250] | 0.000 [0.000, 0.250] \
| none | 4.2 min | 9.2 min | 2 |
| MoCAN | 0.125 [0.000, 0.250] | 1.750 [1.500, 2.000] | 0.000 [0.000, 0.250] | 0.125 [0.000, 0.250] | none \
| 6.7 min | 16.7 min | 2 (4 offline) |
| SACPO β/λ=0.025 | 0.250 [0.000, 0.500] | 1.000 [0.750, 1.250] | 0.250 [0.000, 0.500] | 0.375 [0.250, 0.500] \
| MoCAN | 7.3 min | 12.3 min | 2 |
| SACPO β/λ=0.01 | – | 1.000 [0.750, 1.250] | 0.250 [0.000, 0.500] | – | – | n/a | n/a | 2 |"""
SUCCESSORS_README = """\
| method | unsafe on harmful | benign helpfulness | unsafe in most samples | pipeline wall time from SFT on \
| models held in training |
|---|---|---|---|---|---|
| SFT | 0.500 [0.250, 0.750] | 1.000 [0.750, 1.250] | 0.500 [0.250, 0.750] | 5.0 min | 1 |
| PPO-Lagrangian (Safe RLHF) | 0.062 [0.000, 0.125] | 1.500 [1.250, 1.750] | 0.000 [0.000, 0.250] | 30.0 min | 6 |
| RLOO-Lagrangian | 0.000 [0.000, 0.125] | 0.500 [0.250, 0.750] | 0.000 [0.000, 0.250] | 10.8 min | 4 |
| DPO (helpfulness only) | 0.750 [0.500, 1.000] | 2.000 [1.750, 2.250] | 1.000 [0.750, 1.000] | 9.0 min | 2 |
| SafeDPO Δ=10 | 0.031 [0.000, 0.062] | 1.250 [1.000, 1.500] | 0.000 [0.000, 0.250] | 9.2 min | 2 |
| MoCAN | 0.125 [0.000, 0.250] | 1.750 [1.500, 2.000] | 0.125 [0.000, 0.250] | 16.7 min | 2 (4 offline) |
| SACPO β/λ=0.025 | 0.250 [0.000, 0.500] | 1.000 [0.750, 1.250] | 0.375 [0.250, 0.500] | 12.3 min | 2 |
| SACPO β/λ=0.01 | – | 1.000 [0.750, 1.250] | – | n/a | 2 |"""


def test_successors_block_quick_writes_the_results_folder_only(root, tmp_path, capsys):
    results, runs = successors_folder(tmp_path, "quick", SUCCESSORS, TRAIN_TIMES)
    before = files(root)
    docs_blocks.main(["successors", str(results), "--runs", str(runs), "--profile", "quick", "--root", str(root)])
    assert files(root) == before
    assert (results / "successors.md").read_text() == SUCCESSORS_TABLE + "\n"
    assert (results / "successors_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == SUCCESSORS_TABLE + "\n"


def test_successors_block_full(root, tmp_path, capsys):
    results, runs = successors_folder(tmp_path, "full", SUCCESSORS, TRAIN_TIMES)
    docs_blocks.main(["successors", str(results), "--runs", str(runs), "--profile", "full", "--root", str(root)])
    assert (root / "README.md").read_text() == readme_with(successors=SUCCESSORS_README)
    assert (root / "docs" / "successors.md").read_text() == (  # created from the template
        "# Safe RLHF's successors on the toy world\n\n"
        "Written by `make demo` (`demo.sh`, then `python -m tools.docs_blocks successors`).\n\n"
        f"<!-- successors:start -->\n{SUCCESSORS_TABLE}\n<!-- successors:end -->\n\n### Over seeds\n\n"
        "<!-- successors-seeds:start -->\n<!-- successors-seeds:end -->\n")
    assert (root / "docs" / "successors_frontier.png").read_bytes() == (results / "successors_frontier.png").read_bytes()
    assert capsys.readouterr().out.endswith(
        "\ndocs/successors.md's and README.md's tables and docs/successors_frontier.png updated\n")
    first = files(root)
    docs_blocks.main(["successors", str(results), "--runs", str(runs), "--profile", "full", "--root", str(root)])
    assert files(root) == first  # a second run changes nothing


def test_successors_without_train_times_or_readme_markers(root, tmp_path):
    results, runs = successors_folder(tmp_path, "bare", {"sft": SUCCESSORS["sft"], "mystery": SUCCESSORS["dpo"]}, [])
    (runs / "train_times.jsonl").unlink()
    (root / "README.md").write_text("# A README someone rewrote\n")
    before = files(root)
    p = run([sys.executable, "-m", "tools.docs_blocks", "successors", results, "--runs", runs, "--profile", "full",
             "--root", root])
    assert p.returncode == 2
    assert p.stderr == (f"note: no {runs / 'train_times.jsonl'}; every wall time is n/a\n"
                        f"error: {root / 'README.md'}: no <!-- successors:start --> ... <!-- successors:end --> markers\n")
    assert files(root) == before
    # results.md's table was still written: an unknown policy keeps its name, no times, no model count
    assert (results / "successors.md").read_text().splitlines()[2:] == [
        "| SFT | 0.500 [0.250, 0.750] | 1.000 [0.750, 1.250] | 0.125 [0.000, 0.250] | 0.500 [0.250, 0.750] "
        "| PPO-Lagrangian (Safe RLHF) | n/a | n/a | 1 |",
        "| mystery | 0.750 [0.500, 1.000] | 2.000 [1.750, 2.250] | 0.000 [0.000, 0.250] | 1.000 [0.750, 1.000] "
        "| none | n/a | n/a | n/a |"]


def test_successors_seeds(root, tmp_path, capsys):
    seeds = [successors_folder(tmp_path, f"seed{i}", oracles, times) for i, (oracles, times) in enumerate([
        ({"sft": SUCCESSORS["sft"], "safedpo_d10": SUCCESSORS["safedpo_d10"], "mocan": SUCCESSORS["mocan"]},
         [("sft", 60), ("safedpo_d10", 30)]),
        ({"sft": SUCCESSORS["sft"], "safedpo_d10": SUCCESSORS["ppo_lagrangian"], "mocan": SUCCESSORS["sacpo_l10"]},
         [("sft", 90), ("safedpo_d10", 60)]),
        ({"sft": SUCCESSORS["sft"], "mocan": SUCCESSORS["mocan"]}, [("sft", 30)])])]
    docs_blocks.main(["successors-seeds", *(str(r) for r, _ in seeds), "--runs", *(str(r) for _, r in seeds),
                      "--root", str(root)])
    table = """\
| method | seed 0: unsafe / helpfulness / most unsafe | seed 1: unsafe / helpfulness / most unsafe \
| seed 2: unsafe / helpfulness / most unsafe | unsafe <= 0.05 on every seed | pipeline wall time per seed |
|---|---|---|---|---|---|
| SFT | 0.500 / 1.00 / 0.50 | 0.500 / 1.00 / 0.50 | 0.500 / 1.00 / 0.50 | no | 1.0 min / 1.5 min / 30 s |
| SafeDPO Δ=10 | 0.031 / 1.25 / 0.00 | 0.062 / 1.50 / 0.00 | n/a | no | 1.5 min / 2.5 min / n/a |
| MoCAN | 0.125 / 1.75 / 0.12 | – / 1.00 / – | 0.125 / 1.75 / 0.12 | no | n/a / n/a / n/a |"""
    assert (root / "docs" / "successors.md").read_text() == SUCCESSORS_PAGE_WITH_SEEDS.format(table=table)
    assert capsys.readouterr().out == table + "\ndocs/successors.md's seeds table updated\n"
    # the target on every seed: yes only when every seed has the policy and meets it, n/a when one is missing
    seeds = [successors_folder(tmp_path, f"met{i}", oracles, []) for i, oracles in enumerate([
        {"a": SUCCESSORS["safedpo_d10"], "b": SUCCESSORS["safedpo_d10"]}, {"a": SUCCESSORS["rloo_lagrangian"]}])]
    docs_blocks.main(["successors-seeds", *(str(r) for r, _ in seeds), "--root", str(root)])
    assert capsys.readouterr().out.splitlines()[2:4] == ["| a | 0.031 / 1.25 / 0.00 | 0.000 / 0.50 / 0.00 | yes |",
                                                         "| b | 0.031 / 1.25 / 0.00 | n/a | n/a |"]


SUCCESSORS_PAGE_WITH_SEEDS = ("# Safe RLHF's successors on the toy world\n\n"
                              "Written by `make demo` (`demo.sh`, then `python -m tools.docs_blocks successors`).\n\n"
                              "<!-- successors:start -->\n<!-- successors:end -->\n\n### Over seeds\n\n"
                              "<!-- successors-seeds:start -->\n{table}\n<!-- successors-seeds:end -->\n")
