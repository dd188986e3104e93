"""tools/audit.py: check an implementation of the Safe RLHF math against the official code's own numbers.

    python -m tools.audit                                   # this project, through tools/audit_adapter.py
    python -m tools.audit --adapter my_adapter.py           # your implementation, through your adapter
    python -m tools.audit --adapter my_pkg.audit_adapter --vectors vectors.json --tolerance 1e-12

The vectors (tests/fixtures/official_vectors/vectors.json; provenance and format in the README.md
beside it) hold fixed inputs and the outputs that the official code, PKU-Alignment/safe-rlhf at
82743cc, returned for them when run verbatim in float64: masked means, log-probs with the one-token
shift, end scores, the reward and cost losses (paper eq. 5, 6), the data's pairs and signs, the
KL-shaped reward and cost streams, GAE, the clipped actor and critic losses, the lambda step, and whole
rl_steps of PPO-Lagrangian, PPO and reward shaping. docs/audit.md maps each to its equation.

The adapter is a small Python module (a dotted name or a .py file; tools/audit_adapter.py is this
project's, copy it as a template) with one function per vector group, named after the cases'
`function` field with "/" -> "__" (masked_mean, gae__reward, rl_step__ppo_lag, ...):

    def masked_mean(inputs: dict, hyperparameters: dict) -> dict:
        return {"mean": my_masked_mean(inputs["x"], inputs["mask"])}

  inputs           the case's inputs, each rectangular list of numbers as a torch tensor: float64
                   (float32 where the case's `dtypes` says so, e.g. the fp32_logits actor logits), bool
                   for masks, int64 for ids; scalars, strings, rows and ragged lists as Python values
  hyperparameters  the case's `self.*` / `args.*` values, a dict of Python values
  returns          a dict: output name -> tensor, list or number in the official shape (see the
                   case's `outputs`); `info` is a dict of logged scalars. Leave out what your code
                   does not compute: it is listed as "not compared", never counted as equal.

A group the module lacks is "no counterpart", listed but not a failure; so is a case for which the
function raises NotImplementedError. The checker sets torch's default dtype to float64 while it runs
(the official run had it, and it types a few constants). An optional DEVIATIONS dict in the adapter
declares differences its authors know about: {"case name" or "case name:output": (reason, largest
|diff| expected)}. Such a case prints "documented" with the reason while its difference stays within
that bound; an entry whose case no longer differs is "stale" (the table needs updating) and fails.

Comparison: the largest |adapter - official| over every entry of every output must be <= the
tolerance: --tolerance (1e-12) in general, --fp32_tolerance (1e-6) for a case whose arithmetic is
float32 (a `dtypes` entry says float32, or its name has fp32_logits: the official log_softmax ran in
float32, and another float32 kernel differs by about 1e-7). Strings, ints and nulls must be equal.
Stream outputs (`rewards`, `costs` of the kl_* and rl_step cases) count only where a later step reads
them, the columns >= start = S - 1 where the sequence mask is true (README, "Conventions"); the
official function also fills the others.

Output: one line per group (equal, differs, documented, stale, error or no counterpart; the largest
difference, which output, where, in which case), a line per case that is not equal, and a summary.
Exit status: 0 when every case with a counterpart is equal or a documented deviation within its
bound (--strict: equal only), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "fixtures" / "official_vectors" / "vectors.json"
STREAM_OUTPUTS = {"kl_reward_and_cost_streams": ("rewards", "costs"), "kl_reward_stream/ppo": ("rewards",),
                  "rl_step/ppo_lag": ("rewards", "costs"), "rl_step/ppo": ("rewards",),
                  "rl_step/reward_shaping": ("rewards",)}
FAILING = ("differs", "error", "stale")
ORDER = ("differs", "error", "stale", "documented", "equal", "no counterpart")   # a group shows its worst case


# --------------------------------------------------------------------------------------------
# Loading: the vectors, the adapter, a case's inputs
# --------------------------------------------------------------------------------------------


def load_adapter(spec: str):
    """A dotted module name (tools.audit_adapter) or the path of a .py file. Its imports resolve from
    the current directory and the file's own folder (run the checker from your repository's root)."""
    for folder in (str(Path.cwd()), str(Path(spec).resolve().parent) if spec.endswith(".py") else None):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    if spec.endswith(".py") or Path(spec).is_file():
        loader = importlib.util.spec_from_file_location(Path(spec).stem, spec)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def is_rectangular_numbers(value) -> bool:
    """True for a number or a nested list of numbers/bools with one shape (what becomes a tensor)."""
    if isinstance(value, (bool, int, float)):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, list) for v in value):
        return all(map(is_rectangular_numbers, value)) and len({json.dumps(_shape(v)) for v in value}) == 1
    return all(isinstance(v, (bool, int, float)) for v in value)


def _shape(value) -> list[int]:
    return [len(value)] + _shape(value[0]) if isinstance(value, list) and value else []


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


def as_input(value, float32: bool):
    """A case input as the adapter receives it (see the module docstring)."""
    if not isinstance(value, list) or not is_rectangular_numbers(value):
        return value
    flat = _flat(value)
    if any(isinstance(x, float) for x in flat):
        dtype = torch.float32 if float32 else torch.float64
    else:
        dtype = torch.bool if all(isinstance(x, bool) for x in flat) else torch.int64
    return torch.tensor(value, dtype=dtype)


def case_inputs(case: dict) -> dict:
    dtypes = case.get("dtypes", {})
    return {k: as_input(v, dtypes.get(f"inputs.{k}") == "float32") for k, v in case["inputs"].items()}


def is_float32_case(case: dict) -> bool:
    return "float32" in case.get("dtypes", {}).values() or "fp32_logits" in case["name"]


# --------------------------------------------------------------------------------------------
# Comparing one output
# --------------------------------------------------------------------------------------------


def read_entries(case: dict, key: str) -> torch.Tensor | None:
    """Where a stream output is read later: columns >= start = S - 1 where the sequence mask is true."""
    if key not in STREAM_OUTPUTS.get(case["function"], ()):
        return None
    inputs = case["inputs"]
    mask = torch.tensor(inputs["sequence_mask"] if "sequence_mask" in inputs else
                        [row[1:] for row in inputs["attention_mask"]], dtype=torch.bool)  # (B, L-1)
    start = len(inputs["prompt"][0]) - 1
    mask[:, :start] = False
    return mask


def to_python(value):
    """Tensors and nested lists to plain nested Python lists / numbers (for exact comparisons)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


def compare(expected, actual, read: torch.Tensor | None = None) -> tuple[float, str]:
    """The largest |actual - expected| and where ('[i, j]', or a reason). Exact for strings and nulls."""
    if not is_rectangular_numbers(expected):           # texts, signs with nulls: equal or not
        exp, act = _flat(expected), _flat(to_python(actual))
        if len(exp) != len(act):
            return float("inf"), f" has {len(act)} entries, official {len(exp)}"
        for i, (e, a) in enumerate(zip(exp, act)):
            if e != a or type(e) is str and type(a) is not str:
                return float("inf"), f"[{i}]: {a!r}, official {e!r}"
        return 0.0, ""
    exp = torch.tensor(expected, dtype=torch.float64)
    try:
        act = torch.as_tensor(to_python(actual) if not isinstance(actual, torch.Tensor) else actual)
        act = act.detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        return float("inf"), f": not numbers ({type(e).__name__}: {e})"
    if act.shape != exp.shape:
        return float("inf"), f": shape {tuple(act.shape)}, official {tuple(exp.shape)}"
    diff = (act - exp).abs().nan_to_num(nan=float("inf"))
    if read is not None:
        diff = torch.where(read, diff, 0.0)
    if diff.numel() == 0:
        return 0.0, ""
    flat_index = int(diff.argmax())
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat_index), diff.shape)] if diff.dim() else []
    where = f"[{', '.join(map(str, index))}]" if index else ""
    return float(diff.reshape(-1)[flat_index]), where


def output_items(expected: dict, actual: dict):
    """(output name, official value, adapter value or KeyError) with the `info` dicts flattened."""
    for key, value in expected.items():
        if isinstance(value, dict):
            sub = actual.get(key, {}) if isinstance(actual.get(key, {}), dict) else {}
            for k, v in value.items():
                yield f"{key}[{k}]", v, sub.get(k, KeyError)
        else:
            yield key, value, actual.get(key, KeyError)


# --------------------------------------------------------------------------------------------
# Checking one case, then all of them
# --------------------------------------------------------------------------------------------


def check_case(case: dict, fn, deviations: dict, tolerance: float, fp32_tolerance: float) -> dict:
    """-> {case, status, tol, diff, output, where (the largest difference), diffs (output -> |diff|), detail
    (an error's message), reason (the documented deviations'), not_compared (outputs the adapter left out)}"""
    tol = fp32_tolerance if is_float32_case(case) else tolerance
    result = {"case": case["name"], "tol": tol, "diff": 0.0, "output": "", "where": "", "detail": "",
              "reason": "", "diffs": {}, "not_compared": []}
    if fn is None:
        return {**result, "status": "no counterpart"}
    try:
        actual = fn(case_inputs(case), dict(case["hyperparameters"]))
    except NotImplementedError:
        return {**result, "status": "no counterpart"}
    except Exception as e:  # noqa: BLE001 - an adapter's error is a finding, reported in one line
        return {**result, "status": "error", "detail": f"{type(e).__name__}: {e}".splitlines()[0]}
    differing, compared = [], 0
    for key, expected, value in output_items(case["outputs"], actual or {}):
        if value is KeyError:
            result["not_compared"].append(key)
            continue
        compared += 1
        diff, where = compare(expected, value, read_entries(case, key.split("[")[0]))
        result["diffs"][key] = diff
        if diff > result["diff"] or not result["output"]:
            result.update(diff=diff, output=key, where=where)
        if diff > tol:
            differing.append((key, diff, where))
    if compared == 0:
        return {**result, "status": "no counterpart"}
    # each difference is documented by a "case:output" entry, else by a "case" entry, within its bound
    entries = {k: v for k, v in deviations.items() if k == case["name"] or k.startswith(case["name"] + ":")}
    used, undocumented = {}, []   # used: entry -> its largest (diff, output, where)
    for key, diff, where in differing:
        entry = f"{case['name']}:{key}" if f"{case['name']}:{key}" in entries else case["name"]
        if entry in entries and diff <= entries[entry][1]:
            used[entry] = max(used.get(entry, (0.0, "", "")), (diff, key, where))
        else:
            undocumented.append((key, diff, where))
    if undocumented:
        undocumented.sort(key=lambda u: -u[1])
        key, diff, where = undocumented[0]
        return {**result, "status": "differs", "output": key, "diff": diff, "where": where,
                "detail": ", ".join(f"{k}{w} |diff| {d:.2g}" for k, d, w in undocumented)}
    if set(entries) - set(used):
        return {**result, "status": "stale", "reason": "; ".join(entries[k][0] for k in sorted(set(entries) - set(used)))}
    if differing:
        by_reason: dict[str, list[str]] = {}
        for entry, (diff, key, where) in sorted(used.items()):
            by_reason.setdefault(entries[entry][0], []).append(f"{key}{where} |diff| {diff:.2g}")
        return {**result, "status": "documented",
                "reason": "; ".join(f"{', '.join(found)} ({reason})" for reason, found in by_reason.items())}
    return {**result, "status": "equal"}


def check_all(cases: list[dict], adapter, tolerance: float = 1e-12, fp32_tolerance: float = 1e-6) -> list[dict]:
    """Every case through the adapter, in float64 by default (restored afterwards)."""
    deviations = getattr(adapter, "DEVIATIONS", {})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return [check_case(case, getattr(adapter, case["function"].replace("/", "__"), None), deviations,
                           tolerance, fp32_tolerance) for case in cases]
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def case_line(r: dict) -> str:
    variant = r["case"].split("#", 1)[1]
    if r["status"] == "error":
        return f"    #{variant}: error: {r['detail']}"
    if r["status"] == "stale":
        return f"    #{variant}: stale: documented as a deviation ({r['reason']}), but equal now: update DEVIATIONS"
    if r["status"] == "documented":
        return f"    #{variant}: documented deviation: {r['reason']}"
    return f"    #{variant}: differs: {r['detail']} (tolerance {r['tol']:g})"


def report(cases: list[dict], results: list[dict], strict: bool = False) -> tuple[list[str], int]:
    """The printed lines and the exit status."""
    groups: dict[str, list[dict]] = {}
    for case, r in zip(cases, results):
        groups.setdefault(case["function"], []).append(r)
    lines = []
    for function, rs in groups.items():
        status = min((r["status"] for r in rs), key=ORDER.index)
        compared = [r for r in rs if r["status"] != "no counterpart"]
        line = f"{status:<15} {function:<27} {len(rs)} case{'s' * (len(rs) > 1)}"
        if any(r["output"] for r in compared):
            worst = max(compared, key=lambda r: r["diff"])
            line += f"  max |diff| {worst['diff']:.2g}" + (f" ({worst['output']}{worst['where']} in "
                                                           f"#{worst['case'].split('#', 1)[1]})" if worst["diff"] else "")
            counts = {s: sum(r["status"] == s for r in rs) for s in ORDER}
            if len([c for c in counts.values() if c]) > 1:
                line += "  [" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "]"
        not_compared = sorted({k for r in compared for k in r["not_compared"]})
        if not_compared:
            line += f"  not compared: {', '.join(not_compared)}"
        lines.append(line)
        lines += [case_line(r) for r in rs if r["status"] not in ("equal", "no counterpart")]
    counts = {s: sum(r["status"] == s for r in results) for s in ORDER}
    missing = [f for f, rs in groups.items() if all(r["status"] == "no counterpart" for r in rs)]
    lines.append(f"{len(results)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                 + (f" (no counterpart: {', '.join(missing)})" if missing else ""))
    failed = any(r["status"] in FAILING + (("documented",) if strict else ()) for r in results)
    lines.append("FAIL" if failed else "OK: every case with a counterpart is equal" +
                 (" or a documented deviation" if counts["documented"] else ""))
    return lines, int(failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="tools.audit_adapter",
                        help="module name or .py file with one function per vector group (default: this project's)")
    parser.add_argument("--vectors", default=str(VECTORS), help="the official vectors (default: the shipped fixture)")
    parser.add_argument("--tolerance", type=float, default=1e-12, help="largest |diff| for float64 cases")
    parser.add_argument("--fp32_tolerance", type=float, default=1e-6,
                        help="largest |diff| for cases whose official arithmetic is float32")
    parser.add_argument("--strict", action="store_true", help="documented deviations fail too")
    args = parser.parse_args(argv)
    vectors = json.loads(Path(args.vectors).read_text())
    cases = vectors["cases"]
    shown = Path(args.vectors).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"official vectors: {shown} ({len(cases)} cases, {vectors['source']})")
    print(f"adapter: {args.adapter} | tolerance {args.tolerance:g}, float32 cases {args.fp32_tolerance:g}")
    lines, status = report(cases, check_all(cases, load_adapter(args.adapter), args.tolerance, args.fp32_tolerance),
                           args.strict)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
