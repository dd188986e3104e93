"""data_rules.py: which rows a stage uses, which it drops and why, and how labels are read.

These are the rules a user needs to know about their data (docs/your_data.md walks through them):
  - `load_rows`: any data set through `datasets.load_dataset` (a hub name, a local .json/.jsonl file,
    or a folder of `<split>.jsonl`); a missing field, a field that is not text, a line that is not
    JSON or not UTF-8, an empty file: one line naming the file, field and row.
  - `DataSummary`: rows read, used and dropped by reason (with row numbers); printed before training
    and saved as data_summary.json; `--strict` refuses any drop, more than 5% dropped is a loud warning.
  - `check_eval_rows`: evaluation rows must not be training rows (unless --eval_on_train).
  - `parse_bool`, `parse_id`: labels as data sets write them ("false" is false; never a cast).
  - `alpaca_request`: the Alpaca schema's instruction + input.
Each stage's own row rules (what makes an SFT row or a preference pair unusable) are in its file and
use these. The epoch order and the per-rank batches are run machinery: plumbing.py.
"""

from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from plumbing import UserError, first_line


def load_rows(dataset: str, split: str, *, revision: str | None = None, limit: int | None = None,
              required: tuple[str, ...] = (), text: tuple[str, ...] = (), what: str = "--dataset") -> list[dict]:
    """Rows of a data set through `datasets.load_dataset`, hub or local: the same code path.

    dataset: a hub name (e.g. PKU-Alignment/PKU-SafeRLHF), a local .json/.jsonl file, or a local
    folder holding `<split>.jsonl` (or `<split>.json`). Rows missing a required field, a `text`
    field that is not a string, an empty set, or an unreadable file give one UserError naming the
    file, field and row.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one line says what failed
    path = Path(dataset)
    local = [path] if path.is_file() else sorted(path.glob(f"{split}.json*")) if path.is_dir() else []
    if local and all(f.stat().st_size < 1 << 20 and not f.read_text(errors="replace").strip() for f in local):
        raise UserError(f"{what} {dataset} (split {split}) is empty")  # datasets' own error here is blank
    for f in (f for f in local if f.suffix in (".json", ".jsonl")):  # datasets would fail later, lazily, without naming the line
        with open(f, "rb") as lines:
            for n, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{what} {f} line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                if f.suffix == ".jsonl" and line.strip():
                    try:
                        json.loads(line)
                    except ValueError as e:  # datasets' own message names neither the line nor the problem
                        raise UserError(f"{what} {f} line {n}: not a JSON row ({e})") from None
            if f.suffix == ".json":
                try:
                    json.loads(f.read_bytes())
                except ValueError as e:
                    if f.read_text().lstrip().startswith("["):  # one JSON array (JSON-lines in a .json file: datasets reads it)
                        raise UserError(f"{what} {f}: not valid JSON ({e})") from None
    try:
        if path.is_file():
            ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
        elif path.is_dir():
            files = sorted(path.glob(f"{split}.json*"))
            if not files:
                raise UserError(f"{what} {dataset}: no {split}.jsonl or {split}.json in that folder")
            ds = datasets.load_dataset("json", data_files={split: [str(f) for f in files]}, split=split)
        elif dataset.startswith((".", "/", "~")) or dataset.count("/") != 1:
            raise UserError(f"{what} {dataset}: no such file or folder (and not a hub name 'org/name')")
        else:
            ds = datasets.load_dataset(dataset, split=split, revision=revision)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        rows = ds.to_list()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise UserError(f"{what} {dataset} (split {split}): cannot read it: {first_line(e)}") from None
    if not rows:
        raise UserError(f"{what} {dataset} (split {split}) is empty")
    for i, row in enumerate(rows):
        for field in required:
            if row.get(field) is None:
                raise UserError(f"{what} {dataset} (split {split}): row {i} has no field {field!r}")
        for field in text:
            if row.get(field) is not None and not isinstance(row[field], str):
                raise UserError(f"{what} {dataset} (split {split}): row {i}: {field!r} must be text, "
                                f"got {type(row[field]).__name__} {row[field]!r:.40}")
    return rows


class Unusable(Exception):
    """A row that cannot be trained on (its message is the reason): dropped and counted, not fatal."""


class LeftOut(Exception):
    """A sound row the method's own rule leaves out (SafeDPO discards a pair of two unsafe responses):
    counted in the summary, never a --strict refusal or a warning about the data."""


DROP_WARN_SHARE = 0.05  # more than this share of a split's rows dropped: a loud warning


class DataSummary:
    """What a stage made of one split: rows read, rows used, rows dropped by reason (with the first
    row numbers, counted from 0 in the file's order), rows the method leaves out by its own rule, and
    label statistics. Printed before training and saved in the run folder (data_summary.json)."""

    def __init__(self, flag: str, dataset: str, split: str, purpose: str = ""):
        self.flag, self.dataset, self.split, self.purpose = flag, dataset, split, purpose
        self.read, self.dropped, self.left_out, self.stats, self.notes = 0, {}, {}, {}, []

    def drop(self, reason: str, row: int) -> None:
        bisect.insort(self.dropped.setdefault(reason, []), row)  # row numbers kept in order

    def leave_out(self, reason: str, row: int) -> None:
        bisect.insort(self.left_out.setdefault(reason, []), row)

    @property
    def used(self) -> int:
        return self.read - sum(map(len, self.dropped.values())) - sum(map(len, self.left_out.values()))

    def where(self) -> str:
        return f"{self.flag} {self.dataset} (split {self.split}{', ' + self.purpose if self.purpose else ''})"

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "rows_read": self.read, "rows_used": self.used,
                "dropped": {reason: {"count": len(rows), "rows": rows} for reason, rows in self.dropped.items()},
                **({"left_out": {reason: {"count": len(rows), "rows": rows} for reason, rows in self.left_out.items()}}
                   if self.left_out else {}),
                "stats": self.stats, "notes": self.notes}

    def lines(self) -> list[str]:
        head = f"data {self.where()}: {self.read} rows read, {self.used} used"
        if self.dropped:
            head += ", dropped: " + "; ".join(f"{len(rows)} {reason} (row {', '.join(map(str, rows[:5]))}"
                                               f"{', ...' if len(rows) > 5 else ''})" for reason, rows in self.dropped.items())
        if self.left_out:
            head += ", left out by the method: " + "; ".join(f"{len(rows)} {reason}" for reason, rows in self.left_out.items())
        stats = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.stats.items()]
        return [head] + (["  " + " | ".join(stats)] if stats else []) + [f"  note: {n}" for n in self.notes]

    def check(self, strict: bool) -> list[str]:
        """Refuse under --strict if any row was dropped; return the warnings to print (a loud one when
        more than DROP_WARN_SHARE of the rows went, or every row did). Rows the method leaves out count
        only when none is left."""
        if not self.dropped and not (self.left_out and self.used == 0):
            return []
        row, reason = min((rows[0], reason) for reason, rows in (self.dropped or self.left_out).items())  # the first
        dropped = sum(map(len, self.dropped.values()))
        if strict and dropped:
            raise UserError(f"--strict: {self.where()} row {row}: {reason} ({dropped} of {self.read} "
                            "rows unusable; without --strict they are dropped and counted)")
        if self.used == 0:
            raise UserError(f"{self.where()}: no usable row ({self.read} read; the first, row {row}: {reason})")
        share = dropped / self.read
        if share > DROP_WARN_SHARE:
            return [f"WARNING: {self.where()}: {share:.1%} of the rows dropped (more than {DROP_WARN_SHARE:.0%}); "
                    "check the data and --max_length before trusting this run"]
        return []


def report_data(summaries: dict[str, DataSummary], strict: bool, is_main: bool) -> dict:
    """Print the summaries (rank 0), refuse or warn (every rank alike), return their JSON form."""
    warnings = [w for s in summaries.values() for w in s.check(strict)]
    if is_main:
        for s in summaries.values():
            print("\n".join(s.lines()), flush=True)
        for w in warnings:
            print(w, file=sys.stderr, flush=True)
    return {name: s.as_dict() for name, s in summaries.items()}


def row_key(row: dict, fields: tuple[str, ...]) -> str:
    """A row's identity for duplicates and train/eval overlap: its used fields, exactly."""
    return json.dumps([row.get(f) for f in fields])


def same_rows(train: tuple[str, str, str | None], evaluation: tuple[str, str, str | None]) -> bool:
    """Whether two (dataset, split, revision) name the same rows: one file read as both splits (a
    file has no splits), the same folder and split, or the same hub name, split and revision."""
    (a, a_split, a_rev), (b, b_split, b_rev) = train, evaluation
    pa, pb = Path(a), Path(b)
    if pa.is_file() or pb.is_file():
        return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()
    if pa.is_dir() or pb.is_dir():
        return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve() and a_split == b_split
    return a == b and a_split == b_split and a_rev == b_rev


def check_eval_rows(args, train_keys: set[str], eval_keys: list[str], summary: DataSummary) -> None:
    """The evaluation rows must not be the training rows: refused (same source, or every evaluation
    row also a training row) unless --eval_on_train; a partial overlap is counted in the summary."""
    eval_dataset = args.eval_dataset or args.dataset
    same = same_rows((args.dataset, args.train_split, args.dataset_revision),
                     (eval_dataset, summary.split, args.dataset_revision if not args.eval_dataset else None))
    overlap = sum(k in train_keys for k in eval_keys)
    summary.stats["also_in_train"] = overlap
    if (same or eval_keys and overlap == len(eval_keys)) and not args.eval_on_train:
        why = (f"--dataset {args.dataset} is one file, so its split {summary.split!r} is the training rows"
               if same and Path(args.dataset).is_file() and not args.eval_dataset else
               f"the evaluation rows ({summary.where()}) are the training rows" if same else
               f"every evaluation row ({summary.where()}) is also a training row")
        raise UserError(f"{why}: give --eval_dataset (a file or folder of held-out rows), --eval_split '' for "
                        "no evaluation, or --eval_on_train to evaluate on training rows knowingly")
    if args.eval_on_train and (same or overlap):
        summary.notes.append("evaluating on training rows (--eval_on_train): the evaluation is not held out")


def parse_bool(value, where: str) -> bool:
    """A boolean label as data sets write it: true/false, 1/0, or those spelled as strings. Never a
    cast: bool("false") is True. Anything else is refused, naming the row (`where`)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"{where} must be true/false or 1/0, got {value!r}")


def parse_id(value, where: str) -> int:
    """A response id: 0 or 1 (an int, or "0"/"1"); anything else is refused, naming the row."""
    if not isinstance(value, bool) and isinstance(value, (int, float, str)) and str(value).strip() in ("0", "1", "0.0", "1.0"):
        return int(float(value))
    raise UserError(f"{where} must be 0 or 1, got {value!r}")



def alpaca_request(row: dict) -> str:
    """Alpaca schema: instruction, plus " " + input when there is one
    (safe_rlhf/datasets/raw/alpaca.py@82743cc:L26-42)."""
    return f"{row['instruction']} {row['input']}" if row.get("input") else row["instruction"]


@dataclass
class TrainingData:
    """A supervised stage's training and held-out rows (sft.load_examples) or pairs (reward.load_pairs),
    validated before the output folder is touched, and their summary."""
    train: list[dict]
    train_truncated: int
    """training sequences cut at --max_length"""
    eval: list[dict]
    """held-out rows or pairs ([] with --eval_split '')"""
    eval_truncated: int
    summary: dict
    """data_summary.json: rows read, used and dropped by reason (report_data)"""
