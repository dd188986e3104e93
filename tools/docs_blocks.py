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
  successors RESULTS --runs RUNS [--profile P]
                              Safe RLHF's successors (DPO, SafeDPO, MoCAN, SACPO) beside SFT, PPO, the
                              fixed-nu points and the Lagrangian runs: RESULTS/successors.md (per policy:
                              the oracle, who dominates it, the training wall time of its own stage(s) and
                              of its pipeline from SFT on, from RUNS/train_times.jsonl, the models held) and
                              RESULTS/successors_frontier.png, for every profile; with --profile full (the
                              default is quick) also docs/successors.md's <!-- successors:... --> table (the
                              page is created when missing), README.md's (fewer columns; SFT, the Lagrangian
                              runs and every successor) and docs/successors_frontier.png
  successors-seeds RESULTS... [--runs RUNS...]
                              the same policies over seeds: docs/successors.md's <!-- successors-seeds:... -->
                              table (per seed: unsafe / helpfulness / unsafe-in-most-samples share; the
                              safety target met on every seed; with --runs the pipeline wall times)

    python -m tools.docs_blocks results results
    python -m tools.docs_blocks rloo results-quick-rloo --profile quick
    python -m tools.docs_blocks rounds results-rounds --root /tmp/copy   # README.md and docs/ of /tmp/copy
    python -m tools.docs_blocks successors results-successors --runs runs --profile full
    python -m tools.docs_blocks successors-seeds results-successors-seed{0,1,2} --runs runs-seed{0,1,2}

--root DIR (default: this repository) holds the README.md and docs/ that are rewritten. A file whose
markers are missing is refused (error, exit code 2) rather than left silently as it was.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from plots import plot_successors

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
SUCCESSORS_PAGE = ("# Safe RLHF's successors on the toy world\n\n"
                   "Written by `make demo` (`demo.sh`, then `python -m tools.docs_blocks successors`).\n\n"
                   "<!-- successors:start -->\n<!-- successors:end -->\n\n### Over seeds\n\n"
                   "<!-- successors-seeds:start -->\n<!-- successors-seeds:end -->\n")
SACPO_BETA = 0.1  # dpo.py's beta for SACPO; sacpo_lL is the run at lambda = L, so beta / lambda = 0.1 / L


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


@dataclass
class Method:
    """How one policy of the successors comparison was trained (demo.sh's policy names)."""
    label: str           # readable, for the tables and the plot
    family: str          # plots.FAMILY_STYLE: sft, ppo, nu, safe_rlhf, dpo, other
    own: tuple           # train_times.jsonl names of its own stage(s)
    before: tuple        # the prerequisites from SFT on (the SFT, reward and cost models, SACPO's DPO step)
    models: str          # models held while training
    nu: float | None = None  # the fixed-nu points: nu


def method_of(name: str) -> Method:
    """A demo.sh policy name -> its Method; an unknown name gets its name as label and n/a for the rest.
    Models held: the DPO family a policy and its frozen reference; MoCAN also the reward and cost models in
    its offline phase, freed before training; PPO an actor, reference, reward and cost models and two
    critics; RLOO no critics; SFT the one it trains."""
    rl = ("sft", "reward", "cost")
    number = re.fullmatch(r"(nu_|safedpo_d|sacpo_l)(\d+(?:\.\d+)?)", name)
    prefix, value = number.groups() if number else (None, None)
    if name == "sft":
        return Method("SFT", "sft", ("sft",), (), "1")
    if name == "ppo":
        return Method("PPO (reward only)", "ppo", (name,), rl, "6")
    if prefix == "nu_":
        return Method(f"fixed ν={value}", "nu", (name,), rl, "6", nu=float(value))
    if name == "ppo_lagrangian":
        return Method("PPO-Lagrangian (Safe RLHF)", "safe_rlhf", (name,), rl, "6")
    if name == "rloo_lagrangian":
        return Method("RLOO-Lagrangian", "safe_rlhf", (name,), rl, "4")
    if name == "dpo":
        return Method("DPO (helpfulness only)", "dpo", (name,), ("sft",), "2")
    if prefix == "safedpo_d":
        return Method(f"SafeDPO Δ={value}", "dpo", (name,), ("sft",), "2")
    if name == "mocan":
        return Method("MoCAN", "dpo", (name,), rl, "2 (4 offline)")  # its own run includes the offline phase
    if prefix == "sacpo_l" and float(value) > 0:
        return Method(f"SACPO β/λ={SACPO_BETA / float(value):g}", "dpo", ("dpo", name), ("sft",), "2")
    return Method(name, "other", (), (), "n/a")  # no stages: wall times n/a


def read_train_times(runs: Path) -> dict[str, float]:
    """RUNS/train_times.jsonl (demo.sh: one {"name", "wall_s"} line per training command) -> name: seconds,
    the last line of a name winning (a demo run again); no file: no times (every wall time n/a)."""
    path = runs / "train_times.jsonl"
    if not path.is_file():
        print(f"note: no {path}; every wall time is n/a", file=sys.stderr)
        return {}
    times = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("name"), str) or \
                    not isinstance(row.get("wall_s"), (int, float)):
                raise ValueError(f"{path}:{i}: not a {{\"name\": ..., \"wall_s\": seconds}} line: {line!r}")
            times[row["name"]] = float(row["wall_s"])
    return times


def wall_time(times: dict[str, float], names: tuple) -> str:
    """The summed wall time of these training commands, '42 s' under a minute, else '12.3 min'; n/a when
    one of them has no time (or the method is unknown)."""
    if not names or any(n not in times for n in names):
        return "n/a"
    seconds = sum(times[n] for n in names)
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def successor_rows(oracle: dict, times: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """The successors table, a row per policy in evaluate.py's order."""
    header = ["method", "unsafe on harmful", "benign helpfulness", "benign over-refusal", "unsafe in most samples",
              "dominated by", "own training wall time", "pipeline wall time from SFT on", "models held in training"]
    rows = []
    for name, o in oracle.items():
        m, a = method_of(name), o["all"]
        dominated = o.get("dominated_by")
        rows.append([m.label] + oracle_cells(a) + [majority_cell(a),
                     "–" if dominated is None else ", ".join(method_of(d).label for d in dominated) or "none",
                     wall_time(times, m.own), wall_time(times, m.before + m.own), m.models])
    return header, rows


def majority_cell(a: dict) -> str:
    """evaluate.py's majority_unsafe with its interval; '–' in a results.json written before it existed."""
    return interval(a["majority_unsafe"], "rate") if "majority_unsafe" in a else "–"


def successors_block(results: Path, runs: Path, root: Path, profile: str) -> None:
    """Safe RLHF's successors beside SFT, PPO, the fixed-nu points and the Lagrangian runs: the oracle, the
    training wall times and the models held, as a table and a frontier plot."""
    oracle = json.loads((results / "results.json").read_text()).get("oracle")
    if not oracle:
        raise ValueError(f"{results}/results.json has no oracle measurements, which the successors table shows")
    header, rows = successor_rows(oracle, read_train_times(runs))
    table = markdown_table(header, rows)
    methods = {n: method_of(n) for n in oracle}
    points = {n: (o["all"]["unsafe_rate"]["rate"], o["all"]["helpfulness_benign"]["mean"]) for n, o in oracle.items()}
    points = {n: p for n, p in points.items() if None not in p}
    plot_successors(results / "successors_frontier.png", points, {n: m.label for n, m in methods.items()},
                    {n: m.family for n, m in methods.items()}, {n: m.nu for n, m in methods.items()}, SAFETY_TARGET)
    (results / "successors.md").write_text(table + "\n")
    print(table)
    if profile != "full":
        return
    # README.md: SFT, the Lagrangian runs and every successor (none picked by its result), six columns
    keep = [i for i, n in enumerate(oracle) if methods[n].family in ("sft", "safe_rlhf", "dpo")]
    columns = [0, 1, 2, 4, 7, 8]
    short = markdown_table([header[c] for c in columns], [[rows[i][c] for c in columns] for i in keep])
    doc = root / "docs" / "successors.md"
    doc_text = rewrite(doc, "successors", table, new_page=SUCCESSORS_PAGE)
    readme = rewrite(root / "README.md", "successors", short)
    shutil.copy(results / "successors_frontier.png", root / "docs" / "successors_frontier.png")
    doc.write_text(doc_text)
    (root / "README.md").write_text(readme)
    print("docs/successors.md's and README.md's tables and docs/successors_frontier.png updated")


def successors_seeds_block(results: list[Path], runs: list[Path] | None, root: Path) -> None:
    """The successors table over seeds: per seed unsafe / helpfulness / unsafe-in-most-samples share, and
    whether the safety target holds on every seed; into docs/successors.md."""
    if runs is not None and len(runs) != len(results):
        raise ValueError(f"--runs names {len(runs)} folders for {len(results)} results folders")
    oracles = [json.loads((r / "results.json").read_text()).get("oracle") or {} for r in results]
    times = [read_train_times(r) for r in runs] if runs is not None else None
    names = list(dict.fromkeys(n for o in oracles for n in o))  # every policy, in the first seed's order
    header = (["method"] + [f"seed {i}: unsafe / helpfulness / most unsafe" for i in range(len(results))]
              + [f"unsafe <= {SAFETY_TARGET:g} on every seed"] + (["pipeline wall time per seed"] if times else []))
    rows = []
    for name in names:
        per_seed = [o[name]["all"] if name in o else None for o in oracles]
        unsafe = [a["unsafe_rate"]["rate"] if a else None for a in per_seed]
        met = ("no" if any(u is not None and u > SAFETY_TARGET for u in unsafe) else
               "n/a" if None in unsafe else "yes")
        m = method_of(name)
        rows.append([m.label] + [seed_cell(a) for a in per_seed] + [met]
                    + ([" / ".join(wall_time(t, m.before + m.own) for t in times)] if times else []))
    table = markdown_table(header, rows)
    print(table)
    doc = root / "docs" / "successors.md"
    doc.write_text(rewrite(doc, "successors-seeds", table, new_page=SUCCESSORS_PAGE))
    print("docs/successors.md's seeds table updated")


def seed_cell(a: dict | None) -> str:
    """'0.037 / 1.89 / 0.05': unsafe rate, benign helpfulness, unsafe-in-most-samples share; n/a: no such
    policy on that seed, '–' for a number that could not be measured."""
    if a is None:
        return "n/a"
    values = [(a["unsafe_rate"]["rate"], 3), (a["helpfulness_benign"]["mean"], 2),
              (a.get("majority_unsafe", {}).get("rate"), 2)]
    return " / ".join("–" if v is None else f"{v:.{d}f}" for v, d in values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.docs_blocks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    blocks = parser.add_subparsers(dest="name", required=True)
    for name, block in (("results", results_block), ("ablations", ablations_block), ("rloo", rloo_block),
                        ("rounds", rounds_block), ("successors", successors_block),
                        ("successors-seeds", successors_seeds_block)):
        sub = blocks.add_parser(name, help=block.__doc__.splitlines()[0])
        sub.set_defaults(block=block)
        if name == "successors-seeds":
            sub.add_argument("results", type=Path, nargs="+", help="evaluate.py's folder of each seed")
            sub.add_argument("--runs", type=Path, nargs="+", help="demo.sh's runs folder of each seed (wall times)")
        else:
            sub.add_argument("results", type=Path, help="the folder evaluate.py (rounds: rounds.py) wrote")
        sub.add_argument("--root", type=Path, default=REPO, help="the folder holding README.md and docs/")
        if name == "rloo":
            sub.add_argument("--profile", required=True, help="demo.sh's profile; only full rewrites README and docs")
        if name == "successors":
            sub.add_argument("--runs", type=Path, required=True, help="demo.sh's runs folder (train_times.jsonl)")
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
