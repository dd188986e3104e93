"""tools/docs_blocks.py: the tables and plots of README.md and docs/ that `make demo` rewrites.

Every generated table sits between two markers, `<!-- NAME:start -->` and `<!-- NAME:end -->`; the text
around them is written by hand and kept byte for byte. demo.sh calls one subcommand per block, after the
stage that wrote its results folder:

  results RESULTS             after evaluate.py (the full profile): docs/results.md, written whole from a
                              template, RESULTS/results.md between its <!-- results:... --> markers;
                              README.md's <!-- headline:... --> table (the oracle's three columns for sft,
                              ppo, nu_0.01, nu_1, nu_100 and ppo_lagrangian, from RESULTS/results.json);
                              the plots copied into docs/
  ablations RESULTS           figure 6a: RESULTS/results.md between docs/ablations.md's
                              <!-- ablations:... --> markers (the page is created when missing)
  rloo RESULTS --profile P    RESULTS/rloo_side_by_side.md from RESULTS/results.json, for every profile,
                              and printed; with --profile full also the <!-- rloo:... --> tables of
                              docs/rloo.md (every column) and README.md (six of them), and
                              docs/rloo_curves.png
  rounds RESULTS              RESULTS/rounds.md without its title between docs/rounds.md's
                              <!-- rounds:... --> markers (the page is created when missing),
                              RESULTS/rounds_headline.md between README.md's, the two plots into docs/

    python -m tools.docs_blocks results results
    python -m tools.docs_blocks rloo results-quick-rloo --profile quick
    python -m tools.docs_blocks rounds results-rounds --root /tmp/copy   # README.md and docs/ of /tmp/copy

--root DIR (default: this repository) holds the README.md and docs/ that are rewritten. A file whose
markers are missing is refused (error, exit code 2) rather than left silently as it was.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADLINE_POLICIES = ("sft", "ppo", "nu_0.01", "nu_1", "nu_100", "ppo_lagrangian")
RLOO_POLICIES = ("sft", "ppo", "ppo_lagrangian", "rloo", "rloo_lagrangian")
SAFETY_TARGET = 0.05  # "target met": unsafe on harmful <= 5% and benign helpfulness at least SFT's
RESULTS_PAGE = ("# Results on the toy world\n\n"  # written whole each time
                "Every table here is written by `make demo` (`demo.sh`, then `evaluate.py`); the\n"
                "headline rows are in README.md, the plots next to this file, the metric names in docs/metrics.md.\n\n"
                "### Evaluation of the `make demo` run\n\n<!-- results:start -->\n<!-- results:end -->\n")
ABLATIONS_PAGE = ("# Figure 6a on the toy world: what the decoupling and the cost model's classifier buy\n\n"
                  "Written by `make demo` (`demo.sh ablations`, on the full run's SFT, reward and cost models).\n\n"
                  "<!-- ablations:start -->\n<!-- ablations:end -->\n")
ROUNDS_PAGE = "# Iterated Safe RLHF\n\n<!-- rounds:start -->\n<!-- rounds:end -->\n"


def replace_between_markers(text: str, name: str, block: str) -> str:
    """text with whatever lies between `<!-- name:start -->` and `<!-- name:end -->` replaced by block,
    one line break after the start marker and one before the end marker (every such pair, should a
    file hold two). Raises ValueError when the markers are missing: a file someone edited must not be
    skipped silently."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    new, found = re.subn(re.escape(start) + ".*?" + re.escape(end), lambda m: f"{start}\n{block}\n{end}", text,
                         flags=re.S)
    if not found:
        raise ValueError(f"no {start} ... {end} markers")
    return new


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def interval(stat: dict, key: str) -> str:
    """'0.512 [0.410, 0.611]' (evaluate.py's format), or '–' where no prompt of that kind was seen."""
    return "–" if stat[key] is None else f"{stat[key]:.3f} [{stat['lo']:.3f}, {stat['hi']:.3f}]"


def oracle_cells(o: dict) -> list[str]:
    """The oracle's three columns (evaluate.py's policies table): unsafe on harmful, benign helpfulness,
    benign over-refusal, each with its 95% interval."""
    return [interval(o["unsafe_rate"], "rate"), interval(o["helpfulness_benign"], "mean"),
            interval(o["over_refusal_rate"], "rate")]


def rewrite(path: Path, name: str, block: str, new_page: str | None = None) -> str:
    """path's text with block between its markers (not written yet); new_page is the text of a page
    that does not exist yet. Missing markers raise ValueError, naming the file."""
    try:
        return replace_between_markers(path.read_text() if new_page is None or path.is_file() else new_page,
                                       name, block)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def results_block(results: Path, root: Path) -> None:
    """docs/results.md, README.md's headline table and the plots, from evaluate.py's folder."""
    md = (results / "results.md").read_text().strip()
    oracle = json.loads((results / "results.json").read_text()).get("oracle")
    if not oracle:
        raise ValueError(f"{results}/results.json has no oracle measurements, which README's headline shows")
    # The headline: the first four columns of results.md's policies table (the oracle's), for SFT, plain PPO,
    # three fixed nu and PPO-Lagrangian, rebuilt from the numbers in results.json.
    headline = markdown_table(["policy", "unsafe on harmful", "benign helpfulness", "benign over-refusal"],
                              [[n] + oracle_cells(oracle[n]["all"]) for n in HEADLINE_POLICIES if n in oracle])
    readme = rewrite(root / "README.md", "headline", headline)
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    for png in ("frontier.png", "training_curves.png", "scatter.png", "histograms.png", "sqrt_kl.png"):
        if (results / png).is_file():
            shutil.copy(results / png, docs / png)
    tables = re.sub(r"^(#+) ", r"##\1 ", md, flags=re.M)  # headings one level down, under the page's ###
    (docs / "results.md").write_text(replace_between_markers(RESULTS_PAGE, "results", tables))
    (root / "README.md").write_text(readme)
    print("docs/results.md and README.md's headline table updated; plots in docs/")


def ablations_block(results: Path, root: Path) -> None:
    """docs/ablations.md's tables: figure 6a's evaluation, its headings under the page's."""
    md = (results / "results.md").read_text().strip()
    doc = root / "docs" / "ablations.md"
    doc.write_text(rewrite(doc, "ablations", re.sub(r"^#{1,2} ", "### ", md, flags=re.M), new_page=ABLATIONS_PAGE))
    print("docs/ablations.md: the tables between its markers updated")


def rloo_block(results: Path, root: Path, profile: str) -> None:
    """RLOO-Lagrangian next to PPO-Lagrangian: the oracle, lambda, KL, time and memory of each policy."""
    r = json.loads((results / "results.json").read_text())
    sft_help = r["oracle"]["sft"]["all"]["helpfulness_benign"]["mean"]
    header = ["policy", "models", "unsafe on harmful", "benign helpfulness", "benign over-refusal", "target met",
              "final lambda", "KL", "s per rl_step", "peak memory GiB"]
    rows = []
    for name in RLOO_POLICIES:
        o, t = r["oracle"][name]["all"], r.get("training", {}).get(name)
        met = None not in (o["unsafe_rate"]["rate"], sft_help) and o["unsafe_rate"]["rate"] <= SAFETY_TARGET \
            and o["helpfulness_benign"]["mean"] >= sft_help
        models = "1" if name == "sft" else "4" if name.startswith("rloo") else "6"  # models held in training
        train = ([f"{t['final_lambda']:.3f}", f"{t['final_kl']:.2f}", f"{t['step_time_s']:.3f}",
                  f"{t['peak_memory_gib']:.2f}"] if t else ["–"] * 4)
        rows.append([name, models] + oracle_cells(o) + ["yes" if met else "no"] + train)
    table = markdown_table(header, rows)
    (results / "rloo_side_by_side.md").write_text(table + "\n")
    print(table)
    if profile != "full":
        return
    # docs/rloo.md gets every column, README.md the policy, the oracle's three columns and the time.
    short = markdown_table(header[:5] + header[8:9], [row[:5] + row[8:9] for row in rows])
    doc, readme = rewrite(root / "docs" / "rloo.md", "rloo", table), rewrite(root / "README.md", "rloo", short)
    shutil.copy(results / "curves" / "training_curves.png", root / "docs" / "rloo_curves.png")
    (root / "docs" / "rloo.md").write_text(doc)
    (root / "README.md").write_text(readme)
    print("docs/rloo.md's and README.md's tables and docs/rloo_curves.png updated")


def rounds_block(results: Path, root: Path) -> None:
    """docs/rounds.md's tables and README.md's rounds table, both as rounds.py wrote them, and its plots."""
    md = (results / "rounds.md").read_text().split("\n", 1)[1].strip()  # without its title
    doc = root / "docs" / "rounds.md"
    readme = rewrite(root / "README.md", "rounds", (results / "rounds_headline.md").read_text().removesuffix("\n"))
    for png in ("rounds.png", "rounds_scatter.png"):
        shutil.copy(results / png, root / "docs" / png)
    doc.write_text(rewrite(doc, "rounds", md, new_page=ROUNDS_PAGE))
    (root / "README.md").write_text(readme)
    print("docs/rounds.md and README.md's rounds table updated; docs/rounds.png, docs/rounds_scatter.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.docs_blocks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    blocks = parser.add_subparsers(dest="name", required=True)
    for name, block in (("results", results_block), ("ablations", ablations_block), ("rloo", rloo_block),
                        ("rounds", rounds_block)):
        sub = blocks.add_parser(name, help=block.__doc__.splitlines()[0])
        sub.set_defaults(block=block)
        sub.add_argument("results", type=Path, help="the folder evaluate.py (rounds: rounds.py) wrote")
        sub.add_argument("--root", type=Path, default=REPO, help="the folder holding README.md and docs/")
        if name == "rloo":
            sub.add_argument("--profile", required=True, help="demo.sh's profile; only full rewrites README and docs")
    args = vars(parser.parse_args(argv))
    block, _ = args.pop("block"), args.pop("name")
    try:
        block(**args)
    except (ValueError, OSError) as e:  # markers or a file missing
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
