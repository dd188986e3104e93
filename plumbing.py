"""plumbing.py: what every stage needs and no teacher needs to read.

The model, its sharding and the shared math are in model.py; the rules about data rows (which are
used, dropped and why, how labels are read) are in data_rules.py; this file is the run around them:
  1. Errors        UserError and `run_main`: bad input ends in one line (`error: ...`), exit code 2.
  2. Arguments     a stage's Args dataclass -> argparse, help from the docstring under each field;
                   the recipe (toy or paper) and the range of every number.
  3. Data order    the epoch order (length-grouped, the same on every rank) and lockstep batches.
  4. Run folders   whose a folder is (the project's marker, or new/empty: anything else is refused),
                   the lock, atomic checkpoint folders (write to a temporary folder, rename into
                   place; every rank writes its shards into it; the user's files carried across),
                   --overwrite's replacement, sharded train state (torch.distributed.checkpoint,
                   safetensors: read back on any number of ranks), atomic JSON, the resume check
                   (the same settings and global batches; the number of ranks may change).
  5. Optimiser     AdamW and the lr schedules, gradient clipping, and the optimiser / scheduler /
                   RNG state as safetensors + JSON (no pickle) for an exact --resume.
  6. Logging       the `|`-separated log line, the JSONL sink, the progress bar, peak memory.
It imports neither model.py nor the toy world (the toy world is recognised by its card.json).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import random
import shutil
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException


# --------------------------------------------------------------------------------------------
# 1. Errors: one line for the user, no traceback
# --------------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input (a missing file, field or checkpoint; an empty data set; NaN losses). The message
    names the file, row or argument; `run_main` prints it as one line and exits with status 2."""


def run_main(main, *args) -> None:
    """Call main(*args); turn a UserError into `error: <message>` on stderr and exit code 2.
    Under torchrun the message also goes into the error file torchrun reads, so its closing summary
    ("Root Cause ... traceback :") ends with this line rather than a pointer to the docs."""
    succeeded = False
    try:
        main(*args)
        succeeded = True
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            line = f"error: {e}"
            with contextlib.suppress(OSError), open(error_file, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": "0"}}}, f)
    finally:
        end_replacements(succeeded)  # a replaced run goes back if this one failed before its first save
    if not succeeded:  # refused (any other exception is on its way up already)
        if dist.is_initialized():
            dist.destroy_process_group()
            exit_now(2)
        sys.exit(2)


def exit_now(code: int) -> None:
    """End a torchrun process at once, after what a normal exit does for us (the atexit handlers: the
    run-folder locks, logging; a flush of stdout and stderr) and before Python finalises. FSDP2's device
    meshes stay in DTensor's caches and keep gloo's threads running past destroy_process_group, and an
    interpreter finalising beside them aborted a finished run (SIGABRT, "terminate called without an
    active exception", after every file was written): once in CI and once in 390 two-rank runs of
    `tests/dist_worker.py step` here, on CPU. os._exit skips the finalisation; every file is closed by then."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (some libraries raise with an empty one)."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    """Stop with one line when a loss is NaN/inf, saying what is on disk."""
    if not torch.isfinite(value).all():
        raise UserError(f"{what} is not finite at step {step}; stopping without saving: --output_dir keeps the "
                        "last checkpoint written before this step, if any (try a lower learning rate)")


WEIGHT_GROWTH_LIMIT = 1e4  # a saved weight this many times the model's largest loaded weight: diverged


def check_finite_weights(largest: dict[str, dict[str, float]], folder, scales: dict[str, float | None] | None = None) -> None:
    """Refuse to save weights that hold a NaN or an infinity (a diverged run), or, where the model's
    largest weight at load time is known (scales[name]), a weight more than WEIGHT_GROWTH_LIMIT times
    it. largest: {model name: {weight name: its largest |value| (NaN: not finite)}}, over every rank's
    shard (model.check_weights). Why that bound: AdamW moves a weight by about lr per step at most (its
    step m/sqrt(v) is of order 1), so at any sane learning rate (<= 1e-3) and step count (<= 1e5) a
    weight travels less than 100; a LLaMA's largest weight is at least 1 (its norm weights start at 1).
    A weight 1e4 times larger is an exploded run whose finite but useless weights must not become the
    "last good" checkpoint. Names one offending weight."""
    scales = scales or {}
    for name, per_key in largest.items():
        where = f"the weight {name + '/' if name else ''}"
        for key, value in per_key.items():
            if math.isnan(value):
                raise UserError(f"{where}{key} is not finite; nothing saved: {folder} "
                                "keeps its previous checkpoint, if any (try a lower learning rate)")
            scale = scales.get(name)
            if scale and value > WEIGHT_GROWTH_LIMIT * scale:
                raise UserError(f"{where}{key} reached {value:.3g}, more than {WEIGHT_GROWTH_LIMIT:.0e} times the "
                                f"model's largest weight when loaded ({scale:.3g}): the run diverged; nothing saved: "
                                f"{folder} keeps its previous checkpoint, if any (try a lower learning rate)")


# --------------------------------------------------------------------------------------------
# 2. Arguments: the stage's Args dataclass on the command line
# --------------------------------------------------------------------------------------------


def parse_args(cls, argv=None, description: str | None = None):
    """Parse argv into the stage's Args dataclass. Each field's help is the one-line docstring
    written under it (CleanRL style); bools get --flag / --no-flag; `--help` lists them all.

    Recipes: a training stage's Args has PAPER, the official 7B settings {field: value}. `--recipe
    paper` makes them the defaults (so `--recipe paper --help` lists them), `--recipe toy` keeps the
    dataclass's own defaults (the toy world's); a flag given on the command line beats either.
    Without --recipe the toy recipe is used only when the data are the toy world's; real data
    without a recipe are refused, so a toy learning rate never reaches a real model unnoticed."""
    import argparse

    argv = _flags_and_values(sys.argv[1:] if argv is None else argv)
    paper = getattr(cls, "PAPER", None)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="")
    recipe = pre.parse_known_args(argv)[0].recipe
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    if paper is not None and recipe == "paper":
        defaults.update(paper)
    epilog = None
    if paper is not None:
        flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {v if v != '' else repr('')}"
                 for k, v in paper.items()]
        epilog = (f"--recipe paper ({cls.PAPER_SOURCE}) sets:\n"
                  + "".join(f"  {' '.join(flags[i:i + 3])}\n" for i in range(0, len(flags), 3))
                  + "flags given on the command line override it.")
    values = vars(_parser(cls, defaults, description, epilog).parse_args(argv))
    for name, value in values.items():  # "~/x" as the shell would have it, also when quoted or after "="
        if isinstance(value, str) and value.startswith("~"):
            values[name] = os.path.expanduser(value)
    args = cls(**values)
    check_limits(args)
    if paper is not None:
        check_recipe(args)
    return args


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (not "(default: None)" on optional fields); the epilog's lines kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default == "" else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An unknown flag or a value of the wrong type is one line (`error: ...`, exit 2), like every
    other refusal, not argparse's usage block."""

    def error(self, message):
        raise UserError(f"{message} (--help lists the flags)")


def _parser(cls, defaults: dict, description: str | None, epilog: str | None):
    import ast
    import inspect
    import types
    import typing

    helps = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's Args too
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                helps[node.target.id] = " ".join(nxt.value.value.split())
    hints = typing.get_type_hints(cls)
    parser = _Parser(description=description, epilog=epilog, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        kind, default, help_ = hints[f.name], defaults[f.name], helps.get(f.name, "").replace("%", "%%")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        base = kind
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            base = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(base) is list:
            parser.add_argument(f"--{f.name}", type=typing.get_args(base)[0], nargs="+", default=default, help=help_)
        elif base is not kind and base is not str:  # an optional number: "none" gives None (e.g. --lambda_max none)
            parser.add_argument(f"--{f.name}", type=_or_none(base), default=default, help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=base, default=default, help=help_)
    return parser


def _or_none(base):
    def parse(text: str):
        return None if text.strip().lower() == "none" else base(text)
    parse.__name__ = base.__name__  # argparse names the type in its error: "invalid float value"
    return parse


def check_recipe(args) -> None:
    """--recipe: toy or paper; left out, toy only if every data flag (Args.DATA_FLAGS) is the toy world's."""
    if args.recipe not in ("", "toy", "paper"):
        raise UserError(f"--recipe {args.recipe}: choose toy or paper")
    if args.recipe:
        return
    for flag in type(args).DATA_FLAGS:
        value = getattr(args, flag)
        default = next(f.default for f in dataclasses.fields(args) if f.name == flag)
        if value not in (None, "", "none") and value != default and not is_toy_data(value):
            raise UserError(f"--{flag} {value} is not the toy world's data: choose --recipe paper (the official 7B "
                            "settings; --recipe paper --help lists them) or --recipe toy (the toy world's); "
                            "flags still override either")
    args.recipe = "toy"


def is_toy_data(dataset: str | Path) -> bool:
    """Whether a --dataset value (a file or folder) lies in a toy-world folder: itself, its parent or
    its grandparent holds the world's card.json (toyworld.py writes it, with "name": "toyworld").
    Read from the card, so the run machinery never imports the toy world."""
    path = Path(dataset)
    for folder in (path, path.parent, path.parent.parent):
        card = folder / "card.json"
        if card.is_file():
            try:
                return json.loads(card.read_text()).get("name") == "toyworld"
            except (ValueError, OSError, AttributeError):
                return False
    return False


def recipe_line(args) -> str:
    """The run header's recipe line: which recipe is in force, and every setting that differs from the
    official recipe. The official value of a field is Args.PAPER's, else its dataclass default (a field PAPER
    does not list has the official value as its default), with the mode's values on top where the Args
    has them (paper_by_mode: the policy stages' beta). Not settings: what does not change what a run
    computes (RESUME_MAY_CHANGE), the recipe itself, and the paths of the user's own models that PAPER
    does not name (the trained reward and cost models, critics' inits, a tokenizer) or held-out data."""
    # PAPER's own settings first (in its order: models and data lead), the mode's on top, then the defaults
    official = {**getattr(type(args), "PAPER", {}), **(args.paper_by_mode() if hasattr(args, "paper_by_mode") else {})}
    official.update({f.name: f.default for f in dataclasses.fields(args) if f.name not in official
                     and f.default is not dataclasses.MISSING and f.name not in RESUME_MAY_CHANGE
                     and f.name != "recipe" and not f.name.endswith(("_name_or_path", "eval_dataset"))})
    def show(v):
        return "''" if v == "" else f"{v:.4g}" if isinstance(v, float) else str(v)
    differ = [f"--{k} {show(getattr(args, k))} (paper {show(v)})" for k, v in official.items() if getattr(args, k) != v]
    return f"recipe {args.recipe or '(none)'} | " + (f"differs from the paper: {', '.join(differ)}" if differ
                                                      else "every official setting as the paper's")


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def check_limits(args) -> None:
    """Every number is checked before anything is read or written: finite, and within the range
    the Args class declares in LIMITS {field: (low, high)} (None: unbounded), else >= 0. So a
    negative batch size, --epochs 0 or a NaN learning rate is one line, not a run that saves nothing."""
    limits = getattr(type(args), "LIMITS", {})
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = limits.get(f.name, (0, None))
        too_big = isinstance(value, float) and abs(value) > FLOAT32_MAX  # the training math is float32 at most
        if isinstance(value, float) and not math.isfinite(value) or too_big or low is not None and value < low \
                or high is not None and value > high:
            bounds = {(True, True): f"between {low} and {high}", (True, False): f">= {low}",
                      (False, True): f"<= {high}", (False, False): ""}[(low is not None, high is not None)]
            raise UserError(f"--{f.name} {value}: must be a finite number{' (within float32)' if too_big else ''} "
                            f"{bounds}".rstrip())


def _flags_and_values(argv: list[str]) -> list[str]:
    """Flags with dashes or underscores alike, and a negative number in scientific notation kept as a
    value: argparse takes `--lr -1e-3` for two flags ("expected one argument"), so it becomes
    `--lr=-1e-3`, and the range check then names the flag and the value."""
    out: list[str] = []
    for token in map(_underscored, argv):
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-") and _is_number(token):
            out[-1] += "=" + token
        else:
            out.append(token)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _underscored(token: str) -> str:
    """Flag names take dashes or underscores alike: --estimate-memory is --estimate_memory,
    --no-group-by-length is --no-group_by_length. Values are left alone."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    negated = name.startswith("--no-")
    name = name[5:] if negated else name[2:]
    return ("--no-" if negated else "--") + name.replace("-", "_") + eq + value


# --------------------------------------------------------------------------------------------
# 3. Epoch order and lockstep batches
# --------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int, *, lengths: list[int] | None = None,
                global_batch_size: int = 1, megabatch: int = 64) -> list[int]:
    """The epoch's order of the n training rows: the same on every rank (seeded by seed and epoch),
    so the data position is just the step count and --resume is exact.

    lengths=None: a plain shuffle. With lengths, length-grouped batching (HF Trainer's
    LengthGroupedSampler): shuffle, cut into mega-batches of `megabatch` global batches, sort each
    mega-batch longest first and cut it into global batches, then shuffle the global batches, the
    one holding the longest row first (an out-of-memory shows at step 1, not hours in). Every batch
    then holds rows of similar length, so right padding wastes little compute; each epoch still sees
    every row once, and which rows share a batch stays random within a mega-batch."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    size = megabatch * global_batch_size
    by_length = [i for lo in range(0, n, size)
                 for i in sorted(order[lo:lo + size], key=lambda i: -lengths[i])]          # stable sort
    full = n - n % global_batch_size  # an incomplete last batch stays last (the loop drops it)
    batches = [by_length[lo:lo + global_batch_size] for lo in range(0, full, global_batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch] + by_length[full:]



def rank_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], list[bool]]]:
    """Split items 0..n-1 into batches for this rank, in lockstep: the list is padded with repeats to a
    multiple of batch_size * world_size and rank r takes batches r, r + W, ...; so every rank runs the
    same number of batches (every sharded forward is a collective). Returns [(item indices, is_real
    flags)]; repeats are flagged False and must be left out of every count."""
    per_round = batch_size * world_size
    total = max(1, math.ceil(n / per_round)) * per_round if n else 0
    order, real = [i % n for i in range(total)], [i < n for i in range(total)]
    return [(order[s:s + batch_size], real[s:s + batch_size]) for s in range(rank * batch_size, total, per_round)]


def global_batches(args, n_rows: int, lengths: list[int] | None, start: int, stop: int):
    """The global batch (row indices) of every optimiser step from `start` to `stop` of a supervised
    stage (args: steps_per_epoch, seed, global_batch_size): the same on every rank, each epoch in its own
    order (epoch_order), the last incomplete batch dropped."""
    order, order_epoch = None, -1
    for step in range(start, stop):
        epoch, k = divmod(step, args.steps_per_epoch)
        if epoch != order_epoch:
            order = epoch_order(n_rows, args.seed, epoch, lengths=lengths, global_batch_size=args.global_batch_size)
            order_epoch = epoch
        yield order[k * args.global_batch_size:(k + 1) * args.global_batch_size]


# --------------------------------------------------------------------------------------------
# 4. Run folders: whose they are, atomic checkpoint folders, train state, atomic JSON
# --------------------------------------------------------------------------------------------


# Arguments that do not change what a run computes: --resume may change them.
RESUME_MAY_CHANGE = {"output_dir", "resume", "overwrite", "save", "log_every", "sample_every", "save_every",
                     "eval_every", "stop_at_step", "device", "trust_remote_code", "per_device_eval_batch_size",
                     "static_kv_cache", "compile_decode",  # how the rollout decodes, not what it samples
                     # sizes derived from the others after parsing (checked through those)
                     "global_batch_size", "steps_per_epoch", "total_steps", "world_size", "steps_per_rollout"}
RUN_FILES = ("args.json", "config.json", "metrics.jsonl", "train_state.json")  # a folder with one holds a run
# Every folder the project writes holds this file: the names it wrote there (its manifest). A folder
# is the project's when it has one (or is a run of an older version: LEGACY_RUN); anything else in it
# is the user's and is never removed, overwritten or moved out by a save.
MARKER = ".nano_safe_rlhf.json"
LOG_FILES = ("args.json", "data_summary.json", "metrics.jsonl", "samples.jsonl", "eval.json")  # beside a checkpoint
# What the versions before the marker wrote (fnmatch patterns): recognised, so their runs still resume.
LEGACY_NAMES = LOG_FILES + ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                            "tokenizer*", "special_tokens_map.json", "chat_template.*", "added_tokens.json",
                            "train_state.json", "reward_critic", "cost_critic", "results.json", "results.md",
                            "responses.jsonl", "*.png")


def project_names(folder: Path) -> set[str] | None:
    """The top-level names the project wrote in `folder`: its marker's list and the logs beside a
    checkpoint. None when the folder is not the project's (no marker, and no older run's args.json
    or results.json)."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            return set(json.loads(marker.read_text())["files"]) | set(LOG_FILES) | {MARKER}
        except (ValueError, KeyError, TypeError, OSError):
            return None
    for name, key in (("args.json", "output_dir"), ("results.json", "policies")):  # written by an older version
        try:
            if key in json.loads((folder / name).read_text()):
                return {entry.name for entry in folder.iterdir() if any(fnmatch.fnmatch(entry.name, p) for p in LEGACY_NAMES)}
        except (ValueError, TypeError, OSError):
            continue
    return None


def folder_kind(folder: Path) -> str | None:
    """"run" (a training stage's), "evaluation" (evaluate.py's) or None (not the project's, or empty)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("kind", "run")
    except (ValueError, OSError, AttributeError):
        pass
    if project_names(folder) is None:
        return None
    return "evaluation" if (folder / "results.json").is_file() and not (folder / "args.json").is_file() else "run"


def check_not_root(folder: Path, flag: str) -> None:
    """An output folder is never the file-system root (its parent is itself: no sibling to write)."""
    if Path(os.path.abspath(folder)) == Path(os.path.abspath(folder)).parent:
        raise UserError(f"{flag} {folder}: choose a folder, not the file-system root")


def check_run_folder(folder: str | os.PathLike, flag: str = "--output_dir", kind: str = "run") -> None:
    """Refuse, in one line and before anything is read or written, an output folder that is neither
    new, nor empty, nor the project's of this kind (a training run's, or an evaluation's): a user's
    folder, a data folder, ".", "/" or "~" is never written into, --overwrite or not."""
    folder = Path(folder)
    check_not_root(folder, flag)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} exists and is not a folder")
    entries = sorted(entry.name for entry in folder.iterdir())
    found = folder_kind(folder) if entries else kind
    if found is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{flag} {folder} holds files this project did not write ({shown}); nothing was read "
                        "or written: choose a new or empty folder")
    if found != kind:
        raise UserError(f"{flag} {folder} holds {'an evaluation' if kind == 'run' else 'a training run'}, not "
                        f"{'a training run' if kind == 'run' else 'an evaluation'}; not replacing it: choose another folder")


def _foreign(folder: Path) -> list[str]:
    """The entries of one of our folders that the project did not write (the user's)."""
    ours = project_names(folder) or set()
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in ours)


def _carry_foreign(old: Path, folder: Path) -> None:
    """Move the user's entries of a replaced folder into its successor (renamed, never overwritten)."""
    for name in _foreign(old):
        target = folder / name
        while target.exists():
            target = target.with_name(target.name + ".kept")
        (old / name).rename(target)


def open_run_folder(args, world_size: int, is_main: bool, stage: str | None = None):
    """Claim --output_dir for this run, before anything is read or written. Returns (lock, resume_state):
    keep the lock for the whole run; resume_state is the saved train state with --resume, else None.
      - a folder that is not new, empty or the project's is refused (check_run_folder);
      - an exclusive lock (<output_dir>.lock, flock: the kernel drops it when the process dies, even
        by kill -9): a second run into the same folder is refused, naming the holder's pid;
      - a fresh run into a folder that holds a run is refused unless --overwrite (and even then
        nothing in it is touched before the new run has validated its inputs: begin_run_folder);
      - a save killed half-way, or a replacement that never reached its first save, is undone;
      - --resume: every argument that changes the result must equal the saved args.json, and the
        global batches (check_global_batches: the number of ranks may change); a stage (stage: its name) continues
        only its own checkpoints (the train state names the stage that wrote it)."""
    folder = Path(args.output_dir)
    lock = None
    with on_every_rank():  # rank 0 decides; a refusal there must not leave the others in the barrier
        if is_main:
            check_run_folder(folder)
            lock = _lock(folder)
            recover_checkpoint(folder)  # undo a save that was killed half-way
            if _sibling(folder, ".replaced").exists():  # a replacement killed before its first save: put back
                _end_replacement(folder, succeeded=(folder / "config.json").exists())
            holds_run = folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)
            if holds_run and not args.resume and not args.overwrite:
                _release(lock)
                raise UserError(f"--output_dir {folder} already holds a run: --resume to continue it, --overwrite "
                                "to replace it, or choose another folder")
    if not args.resume:
        return lock, None
    try:  # every rank reads the same files, so every rank refuses alike
        state = load_train_state(folder)
        # checkpoints older than the "stage" key: a policy one is PPO's, a supervised one is not known
        saved_by = state["json"].get("stage", None if "trainer" in state["json"] else "ppo_lagrangian")
        if stage is not None and saved_by is not None and saved_by != stage:
            raise UserError(f"--resume: the checkpoint in --output_dir {folder} was written by {saved_by}.py, not "
                            f"{stage}.py; resume it with that stage, or start this one in another folder")
        saved = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
        check_global_batches(args, saved, saved_world_size(state), world_size)
        for f in dataclasses.fields(args):
            if f.name in saved and f.name not in RESUME_MAY_CHANGE | SPLIT_FLAGS and saved[f.name] != getattr(args, f.name):
                raise UserError(f"--resume: --{f.name} was {saved[f.name]!r} in the interrupted run, now "
                                f"{getattr(args, f.name)!r}; resume with the same settings")
    except UserError:
        if lock is not None:
            _release(lock)  # a refused run lets go of the folder at once
        raise
    return lock, state


# How a global batch is split over ranks: {flag: the other per-rank flags multiplying it}. --resume
# may change these, and the number of ranks, as long as every global batch stays the same.
PER_RANK_SPLIT = {"per_device_train_batch_size": ("gradient_accumulation_steps",),
                  "per_device_prompt_batch_size": ()}
SPLIT_FLAGS = {name for flag, others in PER_RANK_SPLIT.items() for name in (flag, *others)}  # all of them


def check_global_batches(args, saved: dict, saved_ranks: int, world_size: int) -> None:
    """--resume on any number of ranks: each global batch (per-rank size x ranks x accumulation steps)
    must equal the interrupted run's, so the run goes on through the same global order of samples
    (epoch_order, rollout_batches: only the split over ranks changes). Otherwise one line saying what
    to pass."""
    changed = []
    for flag, others in PER_RANK_SPLIT.items():
        if flag not in saved or not hasattr(args, flag):
            continue
        def product(values, ranks):
            return values[flag] * ranks * math.prod(values.get(o, 1) for o in others)
        now = vars(args)
        before, after = product(saved, saved_ranks), product(now, world_size)
        if before == after:
            continue
        rest = world_size * math.prod(now.get(o, 1) for o in others)
        hint = (f"pass --{flag} {before // rest} to keep it" if before % rest == 0 else
                f"it cannot be split evenly over {world_size} rank(s): resume on a number of ranks that divides it")
        split = " x ".join(str(v) for v in (saved[flag], saved_ranks, *(saved.get(o, 1) for o in others if o in saved)))
        changed.append(f"the global batch (--{flag} x ranks{''.join(' x --' + o for o in others if o in saved)}) "
                       f"was {before} ({split}), now {after}; {hint}")
    if changed:  # every one in the one line, so one fix is enough
        raise UserError("--resume: " + "; ".join(changed))


def check_not_finished(folder, step: int, total_steps: int) -> None:
    """--resume of a run that already reached its last step: nothing to continue (re-running its final
    evaluation would log it twice)."""
    if step >= total_steps:
        raise UserError(f"--resume: {folder} holds a finished run (step {step} of {total_steps}); nothing to "
                        "continue: --overwrite to train it again, or choose another folder")


_REPLACING: set[Path] = set()  # run folders whose replaced run waits in <folder>.replaced for the first save


def begin_run_folder(args) -> Path:
    """Rank 0, once every input is validated and just before the run writes its first file: create the
    folder. A fresh run (--overwrite) over an older run first moves that run's files aside into
    <output_dir>.replaced/ (the user's files stay); the new run's first checkpoint deletes them, and a
    run that fails or is killed before it gets there puts them back, so a folder never mixes two runs."""
    folder = Path(args.output_dir)
    older_run = [name for name in sorted(project_names(folder) or ()) if (folder / name).exists()] \
        if folder.is_dir() and not args.resume else []
    if older_run:
        aside = _sibling(folder, ".replaced")
        if aside.exists():
            shutil.rmtree(aside)
        aside.mkdir()
        for name in older_run:
            (folder / name).rename(aside / name)
        _REPLACING.add(_sibling(folder, ""))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_run_files(args, step: int, data_summary: dict, is_main: bool) -> None:
    """Rank 0, once every input is validated: the run folder (begin_run_folder), a resumed run's logs cut
    back to its checkpoint's step, args.json (every setting, the derived sizes included) and
    data_summary.json."""
    if not is_main:
        return
    folder = begin_run_folder(args)
    if args.resume:  # the killed run may have logged past its checkpoint
        trim_logs(folder, step)
    (folder / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1) + "\n")
    write_json_atomic(folder / "data_summary.json", data_summary)


def _end_replacement(folder: Path, succeeded: bool) -> None:
    """Drop the replaced run (the new one saved or finished) or put it back (the new one failed)."""
    _REPLACING.discard(_sibling(folder, ""))
    aside = _sibling(folder, ".replaced")
    if not aside.exists():
        return
    if not succeeded and not (folder / "config.json").exists():
        for name in (project_names(folder) or set()) & set(LOG_FILES):  # the failed run's logs
            (folder / name).unlink(missing_ok=True)
        for entry in aside.iterdir():
            entry.rename(folder / entry.name)
    shutil.rmtree(aside)


def end_replacements(succeeded: bool) -> None:
    """At the end of a run (run_main): settle every replacement this process started."""
    for folder in list(_REPLACING):
        _end_replacement(folder, succeeded)


def _sibling(folder: Path, suffix: str) -> Path:
    folder = Path(os.path.abspath(folder))
    return folder.with_name(folder.name + suffix)


_HELD: list = []  # the lock files this process holds


def _lock(folder: Path):
    """Take <folder>.lock (flock) and write our pid in it; refuse in one line if another run holds it."""
    import fcntl

    path = _sibling(folder, ".lock")
    for held in [h for h in _HELD if h.name == str(path)]:
        _release(held)  # an earlier run in this process (a stage called as a function) is over
    for _ in range(3):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a+")  # noqa: SIM115 - held for the whole run
        except OSError as e:
            raise UserError(f"--output_dir {folder}: cannot write there: {first_line(e)}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise UserError(f"--output_dir {folder} is in use by another run (pid {holder}); "
                            "wait for it or choose another folder") from None
        if path.exists() and os.fstat(lock.fileno()).st_ino == path.stat().st_ino:
            break  # still the file at that path (a run that just ended may have removed the one we opened)
        lock.close()
    else:
        raise UserError(f"--output_dir {folder}: could not take {path}")
    if not os.access(folder if folder.exists() else path.parent, os.W_OK):
        lock.close()
        raise UserError(f"--output_dir {folder}: not writable")
    lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()}\n"), lock.flush()
    _HELD.append(lock)
    atexit.register(_release, lock)  # held, so ours to remove when the run ends
    return lock


def _release(lock) -> None:
    """Remove the lock file of a folder this process holds, then let go of it (at exit, or on refusal).
    A folder made read-only meanwhile keeps the (unlocked, harmless) file: the next run takes it."""
    if lock in _HELD:
        _HELD.remove(lock)
        try:
            Path(lock.name).unlink(missing_ok=True)
        except OSError:
            pass
        lock.close()


@contextlib.contextmanager
def on_every_rank():
    """Run a block that may refuse on some ranks only (rank 0 alone reads the weights and writes the
    files) and raise the refusal on every rank: a rank left waiting in a collective would hang.
    Collective under torchrun: every rank must enter it. One process: a plain block."""
    error = None
    try:
        yield
    except UserError as e:
        error = str(e)
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def _step_of(line: str):
    """The step of a JSON-lines record (0 without one); None for what a kill leaves: half a line."""
    try:
        record = json.loads(line)
        return float(record.get("step", 0)) if isinstance(record, dict) else None
    except (ValueError, TypeError):
        return None


def trim_logs(folder: Path, step: int, names=("metrics.jsonl", "samples.jsonl")) -> None:
    """On --resume, drop the records the killed run logged after its checkpoint's step, so each
    step appears once in the resumed run's logs."""
    for name in names:
        path = folder / name
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)


def recover_checkpoint(folder: str | os.PathLike) -> None:
    """Undo a save that was killed between its renames (see atomic_folder), and drop stale temporary
    folders; at the start of a run (with a lock held), also a replacement (begin_run_folder) that was
    killed before its first save. Safe to call on every start."""
    folder = Path(os.path.abspath(folder))
    old, parent = _sibling(folder, ".old"), folder.parent
    if not folder.exists() and old.exists():
        old.rename(folder)
    elif old.exists():
        _carry_foreign(old, folder)  # killed after the swap, before the user's files moved across
        shutil.rmtree(old)
    if parent.exists():
        for tmp in parent.glob(folder.name + ".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _readable_modes(folder: Path) -> None:
    """Files as open() makes them (0666 less the umask; dirs 0777): some writers create 0600 files,
    which the rest of a team could not read on a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, keep: tuple[str, ...] = ("metrics.jsonl", "args.json", "samples.jsonl", "data_summary.json"),
                  kind: str = "run"):
    """Write a checkpoint into `<folder>.tmp-<pid>`, then swap it into place.

    A crash while writing leaves the previous `folder` untouched (the temporary folder is removed
    on the next start). The swap is two renames (folder -> folder.old, tmp -> folder); a crash
    between them is undone by `recover_checkpoint`. Run files named in `keep` (logs written next
    to the checkpoint) are carried over from the old folder, and so is every entry the project did
    not write (the new folder's MARKER lists what it did): a save never removes a user's file.
    """
    folder = Path(os.path.abspath(folder))
    check_run_folder(folder, kind=kind)
    recover_checkpoint(folder)
    tmp = _sibling(folder, f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for name in keep:
            if (folder / name).is_file() and not (tmp / name).exists():
                shutil.copy2(folder / name, tmp / name)
        names = sorted(entry.name for entry in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"written_by": "nano-safe-rlhf", "kind": kind, "files": names}) + "\n")
        _readable_modes(tmp)
    except BaseException:  # e.g. the disk filled up: the previous folder is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(folder, ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        _carry_foreign(old, folder)
        shutil.rmtree(old)
    _end_replacement(folder, succeeded=True)  # a replaced run (--overwrite) goes with the new run's first save



@contextlib.contextmanager
def atomic_save(folder: Path, is_main: bool):
    """atomic_folder for a save every rank writes into (collective: every rank enters it). Rank 0 makes
    the temporary folder and tells the others where it is; every rank writes; a failure on any rank
    (disk full, read-only) is raised on every rank and rank 0 drops the temporary folder; once all
    have written, rank 0 writes the marker and swaps the folder into place, and the others wait for it."""
    if not dist.is_initialized():
        with atomic_folder(folder) as tmp:
            yield tmp
        return
    with contextlib.ExitStack() as stack:
        where = [None]
        if is_main:
            try:
                where = [str(stack.enter_context(atomic_folder(folder)))]
            except BaseException as e:  # e.g. the parent folder is read-only: no rank may wait for the others
                where = [f"error: {first_line(e)}"]
        dist.broadcast_object_list(where, src=0)
        if where[0].startswith("error: "):
            raise UserError(where[0][len("error: "):])
        error = None
        try:
            yield Path(where[0])
        except Exception as e:  # noqa: BLE001 - any failure must reach every rank, or they hang
            error = e
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {save_error_reason(error)}")
        failed = next((e for e in errors if e), None)
        if failed and error is None:
            error = OSError(failed.split(": ", 1)[1])
        if error is not None:
            raise error  # rank 0: inside atomic_folder, which removes the temporary folder
    dist.barrier()  # rank 0 has swapped the folder into place


def save_error_reason(e: BaseException) -> str:
    """Why a save or a resharded read failed, in a few words: DCP's reader wraps each rank's error in a
    CheckpointException, and safetensors wraps the OS error ('IoError(Os { ..., message: "No space left on device" })')."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]  # (the first failing rank's exception, its traceback)
    reason = first_line(e)
    return reason.split('message: "', 1)[1].split('"', 1)[0] if 'message: "' in reason else reason


# The largest file a save writes, in bytes of whole tensors: the rank that writes a file holds its
# whole tensors on the CPU for that time, so this bounds a save's memory per rank.
SHARD_FILE_BYTES = 2 * 2**30
# Below this, a file is not worth splitting further to give every rank one to write.
MIN_FILE_BYTES = 64 * 2**20


def file_buckets(tensors: dict[str, torch.Tensor], ranks: int, max_bytes: int | None = None) -> dict[str, int]:
    """Which file (1, 2, ...) each tensor of a save goes to, in order. The files aim at total / N bytes,
    N = enough files that none exceeds max_bytes (SHARD_FILE_BYTES), and one per rank (so every rank
    writes one) while files stay over MIN_FILE_BYTES; a toy model's weights are one file. A tensor
    is never split: a file ends before the tensor that would take it past the aim (so a file exceeds
    max_bytes only if one tensor alone does). Sizes are whole tensors' (a DTensor's global shape)."""
    max_bytes = SHARD_FILE_BYTES if max_bytes is None else max_bytes
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(sizes.values())
    n = max(1, min(len(sizes), max(math.ceil(total / max_bytes), min(ranks, total // MIN_FILE_BYTES))))
    aim = min(max_bytes, total / n)
    out, index, filled = {}, 1, 0
    for key, size in sizes.items():
        if filled and filled + size > aim:
            index, filled = index + 1, 0
        out[key] = index
        filled += size
    return out


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns on every call without a process group that it assumes one process: we do mean it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_resharded(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill `targets` (this rank's tensors or DTensor shards, on any number of ranks) in place from the
    whole tensors model.write_whole_files wrote (by any number of ranks): torch.distributed.checkpoint's
    safetensors reader plans which slice of which file each rank needs and reads just that (safe_open
    get_slice). Reading runs no code (safetensors headers and JSON; no pickle). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"--resume: the train state in {folder} is missing (no *.safetensors); start a new run")
    for file in files:  # a damaged file named here, before DCP's own reading (which prints tracebacks) starts
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the message is what matters
            raise UserError(f"--resume: cannot read the train state in {folder}: {file.name} is damaged "
                            f"({first_line(e)})") from None
    try:
        with _one_process_is_intended():
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)))
    except (CheckpointException, OSError, RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"--resume: cannot read the train state in {folder}: {save_error_reason(e)}") from None


def write_train_state(folder: Path, train_state: dict) -> None:
    """Rank 0: the small part of a resumable state, {"tensors": {name: Tensor}, "json": {...}}, as two
    files in `folder` (train_state.safetensors, train_state.json); the AdamW moments (train_state/) are
    written by every rank (model.write_whole_files)."""
    save_file(train_state["tensors"], str(folder / "train_state.safetensors"))
    (folder / "train_state.json").write_text(json.dumps(train_state["json"], indent=1) + "\n")


def load_train_state(folder: str | os.PathLike) -> dict:
    """The small part of a resumable state (tensors, json) and where its shards are ("folder")."""
    folder = Path(folder)
    if not (folder / "train_state.json").is_file():
        raise UserError(f"--resume: {folder} holds no resumable state (train_state.json); "
                        "it was not written by an interrupted run of this stage")
    return {"tensors": load_file(str(folder / "train_state.safetensors")),
            "json": json.loads((folder / "train_state.json").read_text()), "folder": folder}


def write_json_atomic(path: Path, record: dict) -> None:
    """Write JSON to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)



def check_same_run(trainer_state: dict, now: dict) -> None:
    """--resume continues the same run: the saved sizes (data rows, global batch, schedule length)
    must equal this invocation's."""
    for key, value in now.items():
        if trainer_state.get(key, value) != value:  # .get: keys added later are absent from older runs
            raise UserError(f"--resume: {key} was {trainer_state[key]} in the interrupted run, now {value}; "
                            "resume with the same data, global batch sizes and epochs")


# --------------------------------------------------------------------------------------------
# 5. Optimiser, schedule, and optimiser / scheduler / RNG state (safetensors + JSON, no pickle)
# --------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95) and eps 1e-8 by default, as the official code's DeepSpeed optimiser
    (safe_rlhf/configs/constants.py@82743cc:L53); no weight decay on biases and norm weights
    (deviation: the official name test misses LLaMA's final `model.norm.weight`,
    safe_rlhf/utils.py@82743cc:L246-277; we exclude every 1-D parameter)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one CUDA kernel for the whole update (the official FusedAdam); on a CPU the default
    fused = decay[0].device.type == "cuda" if decay else False
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


SCHEDULES = ("cosine", "linear", "constant")


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup over warmup_steps (step s runs at s/warmup_steps of the peak, so the first step
    has lr 0, as in HF), then, exactly as transformers' schedules:
      'cosine':   cosine decay to 0 (get_cosine_schedule_with_warmup),
      'linear':   linear decay to 0 (get_linear_schedule_with_warmup),
      'constant': constant, no warmup (the official critic schedule ignores warmup,
                  safe_rlhf/trainers/rl_trainer.py@82743cc:L266-299)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress)

    if kind not in SCHEDULES:
        raise UserError(f"unknown lr schedule {kind!r}; choose {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, (lambda step: 1.0) if kind == "constant" else factor)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global-norm clipping; works on FSDP2 DTensor gradients (the norm is reduced over ranks). Returns the
    norm before clipping. max_norm 0 means no clipping (as in HF's Trainer): clipping to 0 would zero
    every gradient, a run that trains nothing without a word."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                          max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm



def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str) -> dict:
    """AdamW's state as this rank holds it, keyed by parameter name (torch's flattened optimizer state
    dict: "state.<param>.exp_avg", ...): the tensors (each rank's DTensor shards of the moments, and the
    step counts) go to "shards" (written whole by every rank at once, model.write_whole_files), the rest
    (each parameter's group: lr, betas, weight decay...) to JSON. Nothing is gathered here."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {"tensors": {}, "shards": {prefix: {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}},
            "json": {f"{prefix}.optimizer": {k: v for k, v in osd.items() if not isinstance(v, torch.Tensor)}}}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str, state: dict) -> None:
    """Put optimizer_state's save back, on any number of ranks: this rank's shards of the moments are
    read from train_state/<prefix>/ (read_resharded), the groups from JSON. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    if f"{prefix}.optimizer" not in state["json"]:
        raise UserError(f"--resume: {state['folder']} holds no optimizer state for {prefix} (a checkpoint from an "
                        "older version of this project, or of another stage): start a new run")
    osd = get_optimizer_state_dict(model, optimizer, options=options)  # makes AdamW's (zero) state to load into
    targets = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
    read_resharded(Path(state["folder"]) / "train_state" / prefix, targets)
    osd.update(targets)
    osd.update(state["json"][f"{prefix}.optimizer"])
    set_optimizer_state_dict(model, optimizer, osd, options=options)


def trainer_state(args, d, model: nn.Module, optimizer, scheduler, step: int, train_rows: int, final: bool,
                  stage: str) -> dict:
    """What --resume needs of a supervised stage (stage: sft, reward or cost): the optimiser and schedule,
    the step (the data position), the sizes a resumed run must match, every rank's RNG state, and which
    stage wrote it."""
    return merge_states(
        optimizer_state(model, optimizer, "optimizer"),
        {"tensors": {}, "json": {"trainer": {"step": step, "scheduler": scheduler.state_dict(),
                                             "total_steps": args.total_steps, "train_rows": train_rows,
                                             "global_batch_size": args.global_batch_size,
                                             "group_by_length": args.group_by_length, "final": final},
                                 "stage": stage}},
        gather_rng_states(d))


def rng_state() -> dict:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return {"tensors": tensors, "json": {"rng.python": [version, list(internal), gauss]}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["tensors"]["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in state["tensors"]:
        torch.cuda.set_rng_state(state["tensors"]["rng.cuda"])
    version, internal, gauss = state["json"]["rng.python"]
    random.setstate((version, tuple(internal), gauss))


def merge_states(*parts: dict) -> dict:
    out = {"tensors": {}, "json": {}, "shards": {}}
    for p in parts:
        out["tensors"].update(p["tensors"])
        out["json"].update(p["json"])
        out["shards"].update(p.get("shards", {}))
    return out


def gather_rng_states(dist_) -> dict:
    """Every rank's RNG state, collected on rank 0 (per-rank seeds mean per-rank states). dist_: model.Dist
    (not imported: model.py imports this module, never the other way round)."""
    mine = rng_state()
    if not dist_.enabled:
        return {"tensors": {f"rank0.{k}": v for k, v in mine["tensors"].items()},
                "json": {f"rank0.{k}": v for k, v in mine["json"].items()}}
    gathered = [None] * dist_.world_size
    dist.all_gather_object(gathered, {"t": {k: v.tolist() for k, v in mine["tensors"].items()}, "j": mine["json"]})
    out = {"tensors": {}, "json": {}}
    for r, g in enumerate(gathered):
        out["tensors"].update({f"rank{r}.{k}": torch.tensor(v, dtype=torch.uint8) for k, v in g["t"].items()})
        out["json"].update({f"rank{r}.{k}": v for k, v in g["j"].items()})
    return out


def saved_world_size(state: dict) -> int:
    """How many ranks wrote a train state (each saved its RNG state)."""
    return len([k for k in state["json"] if k.startswith("rank") and k.endswith(".rng.python")])


def restore_rng_states(state: dict, dist_, seed: int, step: int) -> None:
    """Every rank's RNG state as saved, on the same number of ranks (an exact --resume). On another
    number there is no state to give each new rank: they are seeded from (seed, step, rank) instead.
    Nothing in a stage draws from these generators once training starts (batches follow epoch_order,
    rollouts a generator seeded per step), so this only matters to code that would."""
    if saved_world_size(state) != dist_.world_size:
        random.seed(seed * 1_000_003 + step * 1009 + dist_.rank)
        torch.manual_seed(seed * 1_000_003 + step * 1009 + dist_.rank)
        return
    tag = f"rank{dist_.rank}."
    set_rng_state({"tensors": {k[len(tag):]: v for k, v in state["tensors"].items() if k.startswith(tag)},
                   "json": {k[len(tag):]: v for k, v in state["json"].items() if k.startswith(tag)}})


# --------------------------------------------------------------------------------------------
# 6. Logging and progress
# --------------------------------------------------------------------------------------------


def quiet_hf() -> None:
    """Silence transformers' load reports and progress bars (expected 'unexpected keys' such as
    lm_head.weight when a score model starts from a policy would otherwise flood every log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def log_line(record: dict) -> str:
    """The plain `|`-separated log line."""
    def text(k, v):
        if isinstance(v, float):
            return f"{v:,.0f}" if k.startswith("perf/") and abs(v) >= 100 else f"{v:.4g}"
        return str(v)
    return " | ".join(f"{k} {text(k, v)}" for k, v in record.items())



class JsonlLogger:
    """One structured sink that needs no service: a JSON line per record, rank 0 only. The file
    is opened per write, so it follows the run folder across atomic checkpoint swaps."""

    def __init__(self, path: str | os.PathLike, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def log_record(record: dict, step: int, last_step: int, log_every: int, logger: JsonlLogger, bar, meter,
               is_main: bool) -> None:
    """A supervised stage's step record every --log_every steps and at the last: throughput added, the
    JSON line written, the `|` line printed (through the progress bar, so it stays below it)."""
    if step % log_every == 0 or step == last_step:
        record.update(meter.rates(step))
        logger.log(record)
        if is_main:
            bar.write(log_line(record))


def save_due(args, step: int, last_step: int) -> bool:
    """A resumable checkpoint every --save_every steps and at the last step (none with --no-save)."""
    return args.save and ((args.save_every and step % args.save_every == 0) or step == last_step)


def progress(iterable=None, total=None, enabled: bool = True, **kwargs):
    """One tqdm bar on rank 0, only when stderr is a terminal: in a log file its carriage-return
    updates would bury the log lines (the plain lines, with throughput, are printed either way)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


class Throughput:
    """Rates for the log: counts (tokens, pairs, sequences, ...) per second over the window since the
    last log line, the step time, and the ETA of the remaining steps; `summary` for the final line."""

    def __init__(self, step: int, total_steps: int):
        import time
        self.clock = time.perf_counter
        self.start = self.last = self.clock()
        self.first_step, self.last_step, self.total_steps = step, step, total_steps
        self.window: dict[str, float] = {}
        self.totals: dict[str, float] = {}

    def add(self, **counts: float) -> None:
        for k, v in counts.items():
            self.window[k] = self.window.get(k, 0) + v
            self.totals[k] = self.totals.get(k, 0) + v

    def rates(self, step: int) -> dict[str, float]:
        """perf/<count>_per_s, perf/step_time_s and perf/eta_s over the window; starts a new window."""
        now = self.clock()
        seconds, steps = max(now - self.last, 1e-9), max(step - self.last_step, 1)
        out = {f"perf/{k}_per_s": v / seconds for k, v in self.window.items()}
        out.update({"perf/step_time_s": seconds / steps, "perf/eta_s": (self.total_steps - step) * seconds / steps})
        self.last, self.last_step, self.window = now, step, {}
        return out

    def summary(self, step: int) -> str:
        seconds = max(self.clock() - self.start, 1e-9)
        rates = " | ".join(f"{v / seconds:,.1f} {k}/s" for k, v in self.totals.items())
        return (f"{step - self.first_step} steps in {seconds:.{0 if seconds >= 100 else 1}f}s | "
                f"{(step - self.first_step) / seconds:.3g} steps/s | {rates}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: torch's max allocated on a GPU, the peak resident set
    (RSS, which includes Python and the libraries) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB
