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


def readme_with(headline="| stale headline |", rloo="| stale rloo |", rounds="| stale rounds |"):
    """README above with the given blocks: everything else is the hand-written text, unchanged."""
    return (README.replace("| stale headline |", headline).replace("| stale rloo |", rloo)
            .replace("| stale rounds |", rounds))


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
