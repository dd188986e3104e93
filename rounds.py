"""rounds.py: iterated Safe RLHF, the paper's three rounds (Alpaca-7B -> Beaver-v1 -> v2 -> v3) on the toy world.

Safe RLHF (Dai et al. 2023) section 4.1 and figure 3 train three rounds, each on fresh crowd annotations
of the current policy's answers and on red-team prompts; Bai et al. 2022 (section 4.5, "iterated online
RLHF") iterate the same way. Neither the official code nor a peer ships the iteration. Here the toy
world's oracle plays the crowdworkers and the red team, so every round runs, and is measured, on a CPU.
Every model is trained by the stage files, run as subprocesses with their own checks and folders; this
file only writes data (JSONL in the PKU-SafeRLHF schema) and the report.

Round 1 is the pipeline `make demo` runs: the reward and cost models learn data/toy/preference, pairs of
pi_sft's answers (as PKU-SafeRLHF's round 0 held Alpaca-7B's), and v1 is runs/ppo_lagrangian. Round k >= 2,
with pi = v(k-1):
  1. Red team (figure 3a): try `--red_team_tries` phrasings of toyworld.RED_TEAM_PHRASINGS not tried
     before (never in a training, test or evaluation file), `--red_team_samples` answers of pi each; a
     phrasing succeeds when the oracle calls one answer unsafe. `--red_team_eval_share` of the successes
     (rounded up; the paper: 10%) go to the red-team evaluation set, the rest to the round's prompts.
  2. Prompts: every training request (safety-unrelated, and safety-related ones that pi already answers
     safely, "solved", or not, "unsolved", by the oracle on the samples of step 3) plus the red team's.
  3. Fresh annotations (figure 3b): pi answers each prompt `--answers_per_prompt` (k) times in each of
     `--draws` draws; every pair of distinct answers within a draw is labelled by the toy crowd
     (toyworld.label_pair: a helpfulness preference, a harmlessness preference and a safety label per
     answer, with the crowd's noise). The last draw is the round's test split.
  4. Preference models: reward.py and cost.py from the SFT model on every round's pairs so far (Bai et al.
     retrain from scratch on all the data each iteration; the new pairs are few beside round 1's and
     alone would forget what pi no longer says), test split likewise; `--preference_steps` steps, the
     same compute every round.
  5. Policy: ppo_lagrangian.py from pi with the round's models, on the round's prompts, threshold derived
     from the round's cost model. The KL reference is pi, the actor's starting point, as in the official
     code (safe_rlhf/trainers/rl_trainer.py@82743cc:L121-193: the reference model loads the actor's path): each
     round is a trust region around the last policy, not around SFT.
Then "unified" reward and cost models (section 4.2.1) learn the same number of pairs from every round,
and evaluate.py compares SFT, v1, ..., vR on the evaluation prompts: judged by the unified models (the
paper's GPT-4 role) and by the oracle (the human role); on the red-team evaluation set by the oracle.

    python rounds.py --overwrite          # after make demo; writes runs/rounds/ and results-rounds/
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import plumbing
import toyworld
from plots import pyplot
from plumbing import UserError
from stats import fmt_elo


@dataclass
class Args:
    LIMITS: ClassVar[dict] = {"rounds": (2, None), "red_team_eval_share": (0, 1), **dict.fromkeys(
        ("answers_per_prompt", "draws"), (2, None)), **dict.fromkeys(
        ("red_team_samples", "preference_steps", "ppo_steps", "eval_samples", "red_team_eval_samples", "max_new_tokens"), (1, None))}

    runs: str = "runs"
    """round 1: the folder holding sft/, reward/, cost/ and ppo_lagrangian/ (make demo's runs)"""
    data: str = "data/toy"
    """the toy world (round 1's preference pairs and the evaluation prompts)"""
    rounds: int = 3
    """rounds in all, round 1 included (the paper: 3, giving Beaver-v1, v2, v3)"""
    answers_per_prompt: int = 4
    """k: answers per prompt and draw; every pair of distinct ones is annotated (the paper: 3-6)"""
    draws: int = 3
    """draws of k answers per prompt; the last is the round's test split"""
    red_team_tries: int = 24
    """pool phrasings the red team tries per round (the pool has 48; 0 turns red-teaming off)"""
    red_team_samples: int = 4
    """answers of the current policy per tried phrasing; one unsafe answer is a success"""
    red_team_eval_share: float = 0.1
    """share of each round's successful red-team prompts kept for evaluation, rounded up (the paper: 10%)"""
    preference_steps: int = 750
    """optimizer steps of each round's reward and cost model (round 1's: 3 epochs of 4000 pairs)"""
    unified_pairs: int = 1000
    """training pairs per round for the unified models (fewer if a round has fewer)"""
    ppo_steps: int = 160
    """rl_steps of each round's PPO-Lagrangian (round 1's)"""
    eval_samples: int = 8
    """sampled answers per evaluation prompt and policy (figure 5); figure 4 is greedy, one answer"""
    red_team_eval_samples: int = 32
    """sampled answers per prompt and policy on the red-team evaluation set (a few prompts: more samples)"""
    max_new_tokens: int = 64
    """longest answer in tokens, for every evaluate.py run (sampling and evaluation)"""
    preference_args: str = ""
    """extra flags for every reward.py and cost.py run, e.g. --preference_args='--limit 64'"""
    ppo_args: str = ""
    """extra flags for every ppo_lagrangian.py run"""
    evaluate_args: str = ""
    """extra flags for every evaluate.py run that evaluates (not the sampling runs)"""
    seed: int = 0
    """seed of the red team's draws, the crowd's labels and the sampling"""
    output_dir: str = "runs/rounds"
    """round k's data, models and policy go to round<k>/; the unified models to unified/"""
    results_dir: str = "results-rounds"
    """rounds.md, rounds.json, the figures and evaluate.py's three result folders"""
    overwrite: bool = False
    """replace --output_dir and --results_dir if an earlier rounds.py run wrote them"""


def run(cmd: list[str], log: str, stdout: Path | None = None) -> None:
    """One stage file as a subprocess, its output shown (or written to `stdout`, a file); a failing stage
    stops the rounds with its error."""
    print(f"\n==== {log} ====\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    started = time.time()
    if stdout is None:
        code = subprocess.run(cmd).returncode
    else:
        stdout.parent.mkdir(parents=True, exist_ok=True)
        with open(stdout, "w") as f:
            code = subprocess.run(cmd, stdout=f).returncode
    if code != 0:
        where = f"; its output is in {stdout}" if stdout is not None else " (its error is above)"
        raise UserError(f"{log}: {Path(cmd[1]).name} failed{where}; the rounds stop here")
    print(f"({Path(cmd[1]).name}: {time.time() - started:.1f} s)", flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """A data file, written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample(policy: str, prompts: list[str], n: int, out: Path, seed: int, args: Args, log: str) -> dict[str, list[dict]]:
    """n answers of `policy` per prompt (temperature 1), judged by the oracle: evaluate.py --modes oracle.
    Returns prompt -> its n rows of responses.jsonl (response, is_safe, helpfulness, harm, ...), in order."""
    write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in prompts])
    run([sys.executable, "evaluate.py", "--modes", "oracle", "--policies", f"pi={policy}", "--prompts",
         str(out / "prompts.jsonl"), "--samples_per_prompt", str(n), "--seed", str(seed), "--output_dir",
         str(out / "samples"), "--max_new_tokens", str(args.max_new_tokens)], log, stdout=out / "samples.log")
    answers: dict[str, list[dict]] = {p: [] for p in prompts}
    for row in read_jsonl(out / "samples" / "responses.jsonl"):
        answers[row["prompt"]].append(row)
    unsafe = [not r["is_safe"] for rows in answers.values() for r in rows if r["is_harmful"]]
    print(f"{sum(len(rows) for rows in answers.values())} answers; the oracle calls {sum(unsafe)} of the {len(unsafe)} "
          "answers to harmful prompts unsafe", flush=True)
    return answers


def red_team(pool: list[str], policy: str, args: Args, k: int, rdir: Path) -> dict:
    """Step 1: the round's tries, drawn from the untried pool phrasings; successes split into the round's
    prompts and the red-team evaluation set."""
    rng = random.Random(f"rounds/{args.seed}/red_team/{k}")
    tries = sorted(rng.sample(pool, min(args.red_team_tries, len(pool))))
    if not tries:
        return {"tried": [], "succeeded": [], "train": [], "eval": []}
    answers = sample(policy, tries, args.red_team_samples, rdir / "red_team", args.seed + 100 * k, args,
                     f"round {k}: red team tries {len(tries)} phrasings on {policy}")
    return red_team_outcome(answers, args.red_team_eval_share, rng)


def red_team_outcome(answers: dict[str, list[dict]], eval_share: float, rng: random.Random) -> dict:
    """A tried phrasing succeeds when the oracle calls one of its answers unsafe; ceil(eval_share x
    successes) of them, drawn by rng, go to the red-team evaluation set, the rest to the round's prompts."""
    tries = list(answers)
    succeeded = [p for p in tries if any(not a["is_safe"] for a in answers[p])]
    held = set(rng.sample(succeeded, math.ceil(eval_share * len(succeeded))))
    return {"tried": tries, "succeeded": succeeded, "train": [p for p in succeeded if p not in held],
            "eval": sorted(held)}


def annotate(answers: dict[str, list[dict]], args: Args, k: int) -> tuple[list[dict], list[dict], dict]:
    """Step 3: every pair of distinct answers within a draw, labelled by the toy crowd (label_pair).
    Returns (train rows, test rows, counts)."""
    rng = random.Random(f"rounds/{args.seed}/labels/{k}")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    identical = 0
    for prompt, rows in answers.items():
        category = toyworld.find_request(prompt).category
        for d in range(args.draws):
            draw = [r["response"] for r in rows[d * args.answers_per_prompt:(d + 1) * args.answers_per_prompt]]
            for i in range(len(draw)):
                for j in range(i + 1, len(draw)):
                    if draw[i] == draw[j]:
                        identical += 1
                        continue
                    labels = toyworld.label_pair(prompt, draw[i], draw[j], rng)
                    splits["test" if d == args.draws - 1 else "train"].append(
                        {"prompt": prompt, "response_0": draw[i], "response_1": draw[j], **labels, "category": category})
    for rows in splits.values():
        rng.shuffle(rows)
    counts = {"train_pairs": len(splits["train"]), "test_pairs": len(splits["test"]), "identical_skipped": identical,
              **safety_types(splits["train"] + splits["test"])}
    return splits["train"], splits["test"], counts


def safety_types(rows: list[dict]) -> dict:
    """Figure 3b: pairs by the crowd's safety labels, both safe, one safe, both unsafe."""
    n_safe = [bool(r["is_response_0_safe"]) + bool(r["is_response_1_safe"]) for r in rows]
    return {"both_safe": n_safe.count(2), "one_safe": n_safe.count(1), "both_unsafe": n_safe.count(0)}


def prompt_types(answers: dict[str, list[dict]], red_team_prompts: set[str]) -> dict:
    """Figure 3a: safety-unrelated; safety-related solved (none of its answers unsafe: every round types
    on k x draws answers per prompt) or unsolved; red-team."""
    counts = {"safety_unrelated": 0, "solved": 0, "unsolved": 0, "red_team": 0}
    for prompt, rows in answers.items():
        kind = ("red_team" if prompt in red_team_prompts else "safety_unrelated" if not rows[0]["is_harmful"]
                else "unsolved" if any(not r["is_safe"] for r in rows) else "solved")
        counts[kind] += 1
    return counts


def train_models(data: Path, out: Path, args: Args, log: str, steps: int) -> None:
    """Step 4: reward.py (eq. 5) and cost.py (eq. 6), each from the SFT model, on `data`/{train,test}.jsonl."""
    extra = shlex.split(args.preference_args)
    for stage in ("reward", "cost"):
        run([sys.executable, f"{stage}.py", "--recipe", "toy", "--overwrite", "--dataset", str(data),
             "--model_name_or_path", str(Path(args.runs) / "sft"), "--max_steps", str(steps),
             "--output_dir", str(out / stage), *extra], f"{log}: {stage} model")


def balanced(rows_by_round: list[list[dict]], n: int, rng: random.Random) -> list[dict]:
    """The same number of rows from every round (the fewest any round has, at most n), shuffled."""
    n = min([n] + [len(rows) for rows in rows_by_round])
    out = [row for rows in rows_by_round for row in rng.sample(rows, n)]
    rng.shuffle(out)
    return out


# What rounds.py writes into its two folders (fnmatch patterns): --overwrite removes these, nothing else.
ROUNDS_FILES = ("rounds_state.json", "round[0-9]*", "unified", "greedy", "sampled", "rounds.json", "rounds.md",
                "rounds_headline.md", "rounds.png", "rounds_scatter.png")


def check_inputs(args: Args) -> None:
    """Everything the rounds read, before anything is written: the two output folders (rounds.py's own,
    or new or empty), the flags passed on to each stage (parsed by that stage's own Args now, not when
    a round reaches it minutes later), the red team's pool, the round-1 runs and the data."""
    for flag, folder in (("--output_dir", Path(args.output_dir)), ("--results_dir", Path(args.results_dir))):
        plumbing.check_not_root(folder, flag)
        if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
            if not (folder / "rounds_state.json").is_file():
                raise UserError(f"{flag} {folder} exists and is not a rounds.py folder (no rounds_state.json); "
                                "not touching it")
            if not args.overwrite:
                raise UserError(f"{flag} {folder} holds an earlier rounds.py run; give --overwrite to replace it")
    check_stage_flags(args)
    if args.red_team_tries * (args.rounds - 1) > len(toyworld.RED_TEAM_REQUESTS):
        raise UserError(f"--red_team_tries {args.red_team_tries} x {args.rounds - 1} rounds exceeds the pool of "
                        f"{len(toyworld.RED_TEAM_REQUESTS)} phrasings (each is tried once)")
    for name, kind in (("sft", "config.json"), ("reward", "config.json"), ("cost", "eval.json"),
                       ("ppo_lagrangian", "config.json")):
        if not (Path(args.runs) / name / kind).is_file():
            raise UserError(f"--runs {args.runs}: {name}/{kind} is missing; run make demo (or the stages) first")
    for path in (Path(args.data) / "preference" / "train.jsonl", Path(args.data) / "eval" / "prompts.jsonl"):
        if not path.is_file():
            raise UserError(f"--data {args.data}: {path} is missing; python toyworld.py --out {args.data} writes it")


def check_stage_flags(args: Args) -> None:
    """--preference_args, --ppo_args and --evaluate_args, each parsed by the stages it goes to (their
    Args only: the stages still run as programs), so a typo is one line before round 1, not a failure
    in round 2."""
    import cost
    import evaluate
    import ppo_lagrangian
    import reward

    for flag, value, stages in (("--preference_args", args.preference_args, (reward, cost)),
                                ("--ppo_args", args.ppo_args, (ppo_lagrangian,)),
                                ("--evaluate_args", args.evaluate_args, (evaluate,))):
        for stage in stages:
            try:
                plumbing.parse_args(stage.Args, ["--recipe", "toy"] * hasattr(stage.Args, "PAPER") + shlex.split(value))
            except UserError as e:
                raise UserError(f"{flag}: {e} ({stage.__name__}.py)") from None
            except ValueError as e:  # shlex: an unclosed quote
                raise UserError(f"{flag} {value!r}: {e}") from None


def clear_earlier_run(folder: Path) -> None:
    """--overwrite: remove what an earlier rounds.py run wrote there (ROUNDS_FILES); a file of the
    user's in that folder stays."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if any(fnmatch.fnmatch(entry.name, pattern) for pattern in ROUNDS_FILES):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def main(args: Args) -> None:
    check_inputs(args)
    out, results, runs = Path(args.output_dir), Path(args.results_dir), Path(args.runs)
    for folder in (out, results):
        clear_earlier_run(folder)
    for folder in (out, results):
        folder.mkdir(parents=True, exist_ok=True)
        plumbing.write_json_atomic(folder / "rounds_state.json", {"args": asdict(args), "done": False})
    started = time.time()
    train_requests = [r.text for r in toyworld.TRAIN_REQUESTS]
    pool = [r.text for r in toyworld.RED_TEAM_REQUESTS]
    k_draws = args.answers_per_prompt * args.draws

    # ---- round 1: make demo's pipeline; its prompts typed by the oracle on the SFT model's answers --------
    r1 = {"round": 1, "policy_in": str(runs / "sft"), "policy_out": str(runs / "ppo_lagrangian"),
          "reward": str(runs / "reward"), "cost": str(runs / "cost")}
    answers = sample(r1["policy_in"], train_requests, k_draws, out / "round1", args.seed, args,  # as many as later rounds
                     "round 1: the SFT model's answers, to type the prompts")
    r1["prompt_types"] = prompt_types(answers, set())
    r1_rows = {s: read_jsonl(Path(args.data) / "preference" / f"{s}.jsonl") for s in ("train", "test")}
    r1["pairs"] = {"train_pairs": len(r1_rows["train"]), "test_pairs": len(r1_rows["test"]), "identical_skipped": 0,
                   **safety_types(r1_rows["train"] + r1_rows["test"])}
    report = [r1]
    fresh = {"train": [r1_rows["train"]], "test": [r1_rows["test"]]}
    red_team_eval: list[dict] = []
    policy = r1["policy_out"]

    # ---- rounds 2..R ---------------------------------------------------------------------------------
    for k in range(2, args.rounds + 1):
        rdir = out / f"round{k}"
        rec = {"round": k, "policy_in": policy}
        rt = red_team(pool, policy, args, k, rdir)  # --red_team_tries 0: no tries
        pool = [p for p in pool if p not in rt["tried"]]  # each phrasing is tried once
        red_team_eval += [{"prompt": p, "round": k} for p in rt["eval"]]
        rec["red_team"] = {"tried": len(rt["tried"]), "succeeded": len(rt["succeeded"]),
                           "success_rate": len(rt["succeeded"]) / len(rt["tried"]) if rt["tried"] else None,
                           "to_prompts": rt["train"], "to_eval": rt["eval"]}
        prompts = train_requests + rt["train"]
        answers = sample(policy, prompts, k_draws, rdir / "annotation", args.seed + 100 * k + 1, args,
                         f"round {k}: {policy} answers {len(prompts)} prompts {k_draws} times")
        rec["prompt_types"] = prompt_types(answers, set(rt["train"]))
        train, test, rec["pairs"] = annotate(answers, args, k)
        fresh["train"].append(train)
        fresh["test"].append(test)
        data = rdir / "data"
        write_jsonl(data / "preference" / "train.jsonl", [r for rows in fresh["train"] for r in rows])
        write_jsonl(data / "preference" / "test.jsonl", [r for rows in fresh["test"] for r in rows])
        write_jsonl(data / "prompts" / "train.jsonl", [{"prompt": p, "category": toyworld.find_request(p).category}
                                                       for p in prompts])
        train_models(data / "preference", rdir, args, f"round {k}", args.preference_steps)
        run([sys.executable, "ppo_lagrangian.py", "--recipe", "toy", "--overwrite", "--actor_model_name_or_path", policy,
             "--reward_model_name_or_path", str(rdir / "reward"), "--cost_model_name_or_path", str(rdir / "cost"),
             "--dataset", str(data / "prompts"), "--max_steps", str(args.ppo_steps), "--seed", str(42 + k),
             "--output_dir", str(rdir / "policy"), *shlex.split(args.ppo_args)], f"round {k}: PPO-Lagrangian from {policy}")
        rec.update(reward=str(rdir / "reward"), cost=str(rdir / "cost"), policy_out=str(rdir / "policy"))
        report.append(rec)
        policy = rec["policy_out"]

    # ---- unified models: the same number of fresh pairs from every round ------------------------------
    rng = random.Random(f"rounds/{args.seed}/unified")
    unified = out / "unified"
    write_jsonl(unified / "data" / "train.jsonl", balanced(fresh["train"], args.unified_pairs, rng))
    write_jsonl(unified / "data" / "test.jsonl", balanced(fresh["test"], args.unified_pairs, rng))
    train_models(unified / "data", unified, args, "unified models", args.preference_steps)

    # ---- evaluation: figure 4 (greedy), figure 5 (sampled), the red-team evaluation set -----------------
    versions = ["sft"] + [f"v{k}" for k in range(1, args.rounds + 1)]
    policies = [f"sft={runs / 'sft'}"] + [f"v{r['round']}={r['policy_out']}" for r in report]
    judges = ["--reward_model", str(unified / "reward"), "--cost_model", str(unified / "cost")]
    extra = ["--max_new_tokens", str(args.max_new_tokens), *shlex.split(args.evaluate_args)]
    run([sys.executable, "evaluate.py", "--policies", *policies, *judges, "--temperature", "0", "--modes", "generate",
         "--output_dir", str(results / "greedy"), *extra], "figure 4: greedy answers scored by the unified models")
    run([sys.executable, "evaluate.py", "--policies", *policies, *judges, "--samples_per_prompt", str(args.eval_samples),
         "--preference_dataset", str(unified / "data"), "--output_dir", str(results / "sampled"), *extra],
        "figure 5: Elo and unsafe rates, judged by the unified models and by the oracle")
    if red_team_eval:
        write_jsonl(out / "red_team_eval.jsonl", red_team_eval)
        run([sys.executable, "evaluate.py", "--policies", *policies, "--modes", "oracle", "--prompts",
             str(out / "red_team_eval.jsonl"), "--samples_per_prompt", str(args.red_team_eval_samples), "--output_dir",
             str(results / "red_team"), *extra], "figure 5c: the red-team evaluation set, judged by the oracle")
    summary = summarize(report, versions, results, args, time.time() - started)
    write_report(results, summary)
    for folder in (out, results):
        plumbing.write_json_atomic(folder / "rounds_state.json", {"args": asdict(args), "done": True})


def table1_row(name: str, reward: str, cost: str) -> dict:
    """Table 1 from reward.py's and cost.py's eval.json (their held-out split)."""
    r, c = (json.loads((Path(p) / "eval.json").read_text()) for p in (reward, cost))
    return {"models": name, "reward_accuracy": r.get("eval/accuracy"), "cost_accuracy": c.get("eval/accuracy"),
            "cost_sign_accuracy": c.get("eval/accuracy_sign")}


def summarize(report: list[dict], versions: list[str], results: Path, args: Args, seconds: float) -> dict:
    """rounds.json: the per-round records and the figures' numbers, read from evaluate.py's results.json."""
    sampled = json.loads((results / "sampled" / "results.json").read_text())
    red = results / "red_team" / "results.json"
    red = json.loads(red.read_text()) if red.is_file() else None
    for i, rec in enumerate(report):
        rec["table1"] = table1_row(f"round {rec['round']}", rec["reward"], rec["cost"])
        log = [json.loads(line) for line in (Path(rec["policy_out"]) / "metrics.jsonl").read_text().splitlines()
               if '"lagrangian/lambda"' in line]
        rec["ppo"] = {"threshold": json.loads((Path(rec["policy_out"]) / "args.json").read_text()).get("threshold"),
                      "final_lambda": log[-1]["lagrangian/lambda"] if log else None,
                      "final_episode_cost": log[-1]["lagrangian/episode_cost"] if log else None}
    unified = Path(args.output_dir) / "unified"
    unsafe = {v: {"evaluation": sampled["oracle"][v]["all"]["unsafe_rate"],
                  "held_out": sampled["oracle"][v]["held_out"]["unsafe_rate"],
                  "red_team": red["oracle"][v]["all"]["unsafe_rate"] if red else None} for v in versions}
    return {"args": asdict(args), "seconds": seconds, "rounds": report,
            "table1_unified": table1_row("unified", str(unified / "reward"), str(unified / "cost")),
            "elo": sampled.get("elo_ci"), "unsafe": unsafe,
            "helpfulness_benign": {v: sampled["oracle"][v]["all"]["helpfulness_benign"] for v in versions},
            "over_refusal": {v: sampled["oracle"][v]["all"]["over_refusal_rate"] for v in versions},
            "red_team_eval_prompts": red["n_prompts"] // args.red_team_eval_samples if red else 0,
            "evaluation_prompts": sampled["n_prompts"] // args.eval_samples}


def ci(stat: dict | None, key: str = "rate", pct: bool = True) -> str:
    if not stat or stat.get(key) is None:
        return "–"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.2f}")
    return f"{f(stat[key])} [{f(stat['lo'])}, {f(stat['hi'])}]"


def render(s: dict) -> str:
    """rounds.md: the tables, in the paper's order (figure 3, Table 1, figure 5)."""
    versions = list(s["unsafe"])
    md = [f"Rounds: {len(s['rounds'])}; wall time {s['seconds'] / 60:.1f} min; {s['evaluation_prompts']} evaluation "
          f"prompts x {s['args']['eval_samples']} samples per policy; red-team evaluation set: {s['red_team_eval_prompts']} "
          f"prompts x {s['args']['red_team_eval_samples']} samples.", ""]
    md += ["### Figure 3a: the prompts of each round (typed by the oracle on the round's starting policy)", "",
           "| round | from | safety-unrelated | solved | unsolved | red-team | red team: tried | succeeded | success rate "
           "| to the red-team eval set |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        t, rt = r["prompt_types"], r.get("red_team")
        rate = "–" if not rt or rt["success_rate"] is None else f"{100 * rt['success_rate']:.0f}%"
        md.append(f"| {r['round']} | {Path(r['policy_in']).as_posix()} | {t['safety_unrelated']} | {t['solved']} | "
                  f"{t['unsolved']} | {t['red_team']} | {rt['tried'] if rt else '–'} | {rt['succeeded'] if rt else '–'} | "
                  f"{rate} | {len(rt['to_eval']) if rt else '–'} |")
    md += ["", "### Figure 3b: the fresh pairs of each round, by the crowd's safety labels", "",
           "| round | train pairs | test pairs | identical answers skipped | both safe | one safe | both unsafe |",
           "|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        p = r["pairs"]
        md.append(f"| {r['round']} | {p['train_pairs']} | {p['test_pairs']} | {p['identical_skipped']} | {p['both_safe']} | "
                  f"{p['one_safe']} | {p['both_unsafe']} |")
    md += ["", "### Table 1: preference models of each round (on every round's test pairs so far) and the unified ones "
           "(balanced test pairs of all rounds)", "",
           "| models | reward ranking accuracy | cost ranking accuracy | cost safety-sign accuracy | PPO threshold | "
           "final lambda |", "|---|---|---|---|---|---|"]
    for r in s["rounds"] + [{"table1": s["table1_unified"]}]:
        t, ppo = r["table1"], r.get("ppo", {})
        threshold, lam = ppo.get("threshold"), ppo.get("final_lambda")
        md.append(f"| {t['models']} | {t['reward_accuracy']:.3f} | {t['cost_accuracy']:.3f} | {t['cost_sign_accuracy']:.3f} | "
                  f"{'–' if threshold is None else format(threshold, '+.3f')} | {'–' if lam is None else format(lam, '.3f')} |")
    md += ["", "### Figure 5c: the oracle's unsafe rate on harmful prompts (95% intervals)", "",
           "| policy | evaluation prompts | held-out phrasings | red-team evaluation set | benign helpfulness | "
           "benign over-refusal |", "|---|---|---|---|---|---|"]
    for v in versions:
        u = s["unsafe"][v]
        md.append(f"| {v} | {ci(u['evaluation'])} | {ci(u['held_out'])} | {ci(u['red_team'])} | "
                  f"{ci(s['helpfulness_benign'][v], 'mean', False)} | {ci(s['over_refusal'][v])} |")
    for judge, by_subset in (s["elo"] or {}).items():
        who = "the unified models (the paper's GPT-4 role)" if judge == "models" else "the oracle (the human role)"
        md += ["", f"### Figure 5a/5b: Elo judged by {who}; sft = 1000, 95% bootstrap intervals over prompts", "",
               "| policy | " + " | ".join(f"{c} ({sub} prompts)" for sub in by_subset for c in ("helpfulness", "harmlessness"))
               + " |", "|---" * (1 + 2 * len(by_subset)) + "|"]
        for v in versions:
            md.append(f"| {v} | " + " | ".join(fmt_elo(by_subset[sub][c][v]) for sub in by_subset
                                                for c in ("helpfulness", "harmlessness")) + " |")
    return "\n".join(md) + "\n"


def headline(s: dict) -> str:
    """README's table: per version, the oracle's unsafe rate and the Elo of both judges on every prompt."""
    elo = s["elo"] or {}
    rows = ["| policy | unsafe on harmful (oracle) | helpfulness Elo (R) | harmlessness Elo (C) | helpfulness Elo (oracle) "
            "| harmlessness Elo (oracle) |", "|---|---|---|---|---|---|"]
    for v in s["unsafe"]:
        cells = [fmt_elo(elo[j]["all"][c][v]) if j in elo else "–" for j in ("models", "oracle")
                 for c in ("helpfulness", "harmlessness")]
        rows.append(f"| {v} | {ci(s['unsafe'][v]['evaluation'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(results: Path, s: dict) -> list[str]:
    """Figure 5a/5b (Elo with intervals, both judges, every prompt) and figure 5c (unsafe rates)."""
    plt = pyplot()
    versions = list(s["unsafe"])
    x = range(len(versions))
    judges = list(s["elo"] or {})
    fig, axes = plt.subplots(1, len(judges) + 1, figsize=(5.5 * (len(judges) + 1), 4.2), squeeze=False)
    for ax, judge in zip(axes[0], judges):
        for off, c in ((-0.18, "helpfulness"), (0.18, "harmlessness")):
            e = s["elo"][judge]["all"][c]
            ys = [e[v]["elo"] for v in versions]
            err = [[y - e[v]["lo"] for y, v in zip(ys, versions)], [e[v]["hi"] - y for y, v in zip(ys, versions)]]
            ax.bar([i + off for i in x], [y - 1000 for y in ys], 0.36, bottom=1000, yerr=err, capsize=3, label=c)
        ax.axhline(1000, color="k", lw=0.8)
        ax.set(xticks=list(x), xticklabels=versions, ylabel="Elo (sft = 1000)",
               title=f"fig. 5{'a' if judge == 'models' else 'b'}: judged by {'R and C' if judge == 'models' else 'the oracle'}")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    for off, key, label in ((-0.27, "evaluation", "evaluation prompts"), (0, "held_out", "held-out phrasings"),
                            (0.27, "red_team", "red-team evaluation set")):
        stats = [s["unsafe"][v][key] for v in versions]
        if any(st is None or st.get("rate") is None for st in stats):
            continue
        ys = [100 * st["rate"] for st in stats]
        err = [[y - 100 * st["lo"] for y, st in zip(ys, stats)], [100 * st["hi"] - y for y, st in zip(ys, stats)]]
        ax.bar([i + off for i in x], ys, 0.26, yerr=err, capsize=3, label=label)
    ax.axhline(5, color="k", lw=0.8, ls="--", label="5% target")
    ax.set(xticks=list(x), xticklabels=versions, ylabel="unsafe answers to harmful prompts (%)",
           title="fig. 5c: the oracle's unsafe rate")
    ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(results / "rounds.png", dpi=120), plt.close(fig)
    shutil.copy(results / "greedy" / "scatter.png", results / "rounds_scatter.png")
    return ["rounds.png", "rounds_scatter.png"]


def write_report(results: Path, s: dict) -> None:
    s["files"] = plot(results, s)
    plumbing.write_json_atomic(results / "rounds.json", s)
    md = render(s)
    (results / "rounds.md").write_text("# Iterated Safe RLHF on the toy world (rounds.py)\n\n" + md)
    (results / "rounds_headline.md").write_text(headline(s))
    print("\n" + md + f"\nwrote rounds.md, rounds_headline.md, rounds.json, {', '.join(s['files'])} to {results}/")


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.split("\n")[0])))
