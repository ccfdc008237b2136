"""The plumbing every stage shares (nanochat's common.py): config loading, distributed setup, checkpoints by path or
Hugging Face Hub id, the guard that stops a run gone wrong, metrics lines, and the state a resumed run continues
from. It knows nothing of Ovis2.5 and imports no module of ours: the bottom of common <- model <- tools <- data."""

import bisect
import dataclasses
import importlib
import json
import math
import os
import random
import re
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# Config: dataclass defaults <- `--config x.json` <- `--key=value`


class RunError(RuntimeError):
    """A run that must stop and say so (it diverged, or there is nothing to train on): exit non-zero, no final/."""


def check_choices(cfg):
    """Each Config's __post_init__: a field typed Literal[...] must hold one of its values (typos are errors)."""
    for k, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is typing.Literal and getattr(cfg, k) not in typing.get_args(tp):
            raise ValueError(f"config key {k!r}: {getattr(cfg, k)!r} is not one of {list(typing.get_args(tp))}")


def coerce(v, tp, key: str):
    """A JSON or command-line value -> the field's type; CLI text is read as JSON (true, 3, 1e-5, [1, 2])."""
    if typing.get_origin(tp) is typing.Literal:  # checked against its values in check_choices
        return v
    opts = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if type(None) in opts and (v is None or (isinstance(v, str) and v.lower() in ("none", "null"))):
        return None
    if isinstance(v, str) and str not in opts:
        try:
            v = json.loads(v.lower() if v.lower() in ("true", "false") else v)
        except ValueError:
            pass
    for t in opts:
        base = typing.get_origin(t) or t
        if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(base, type) and isinstance(v, base) and not (isinstance(v, bool) and base is not bool):
            return v
    raise ValueError(f"config key {key!r}: {v!r} is not a {tp}")


def cli_pairs(argv: list[str]) -> list[tuple[str, str]]:
    """`--key=value` / `--key value` arguments -> [(key, value)]; dashes in a key read as underscores."""
    argv, out = list(argv), []
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; use --key=value")
        k, eq, v = arg[2:].partition("=")
        if not (eq or argv):
            raise ValueError(f"--{k} needs a value")
        out.append((k.replace("-", "_"), v if eq else argv.pop(0)))
    return out


def load_config(cls, argv: list[str] | None = None):
    """cls() defaults <- `--config x.json` <- `--key=value`, parsed by the field's type. Unknown keys are errors; JSON
    keys starting with "_" are comments; deepspeed's --local_rank is ignored (LOCAL_RANK is in the environment)."""
    cli = cli_pairs(sys.argv[1:] if argv is None else argv)
    items = [(k, v) for c, p in cli if c == "config" for k, v in json.loads(Path(p).read_text()).items()
             if not k.startswith("_")] + [(k, v) for k, v in cli if k not in ("config", "local_rank")]
    names = [f.name for f in dataclasses.fields(cls)]
    for k, _ in items:
        if k not in names:
            raise ValueError(f"unknown config key {k!r}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], k) for k, v in items})


def import_object(path: str, key: str):
    """"pkg.mod:Name" or "pkg.mod.name" (a user's tool, scorer...) -> the object; an error names the config key."""
    mod, _, attr = path.rpartition(":" if ":" in path else ".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{key}: cannot import {path!r} ({type(e).__name__}: {e})") from None


def setup_distributed(timeout_s: float = 1800) -> tuple[int, int, int]:
    """deepspeed.init_distributed, also for a plain `python x.py` (one process). Returns (rank, world, local_rank)."""
    import socket
    from datetime import timedelta

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # the CPU shm op serves only inference all-reduce but costs a 30 s compile on first init
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=None, timeout=timedelta(seconds=timeout_s))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints by path or Hugging Face Hub id


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name or org/name@revision
HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.py"]  # never pickled weights


def split_hub_id(name: str) -> tuple[str, str | None]:
    """"org/name@rev" -> ("org/name", "rev"); a local dir or a plain id -> (name, None)."""
    if os.path.isdir(name) or not HUB_ID.match(name):
        return name, None
    repo, _, revision = name.partition("@")
    return repo, revision or None


def resolve_checkpoint(name: str) -> str:
    """A checkpoint dir (as is) or a Hub id ("AIDC-AI/Ovis2.5-9B", "org/name@rev") fetched into the HF cache (HUB_FILES)
    -> a local dir. Every rank calls it: local rank 0 downloads first, the others find the files after a barrier."""
    if os.path.isdir(name):
        return name
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"{name}: no such checkpoint directory (a Hub id reads org/name or org/name@revision)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = split_hub_id(name)
    together = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if together and not first:
        torch.distributed.barrier()
    try:
        path, err = snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES), None
    except Exception as e:  # noqa: BLE001 (re-raised below with what to do, after the barrier)
        path, err = None, e
    if together and first:
        torch.distributed.barrier()  # reached on failure too: the other ranks must never hang
    if err is not None:
        offline = os.environ.get("HF_HUB_OFFLINE") or "unset"
        why = ("the Hugging Face Hub has no such model or revision (or it is gated: run `hf auth login`)"
               if isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError))
               else "it is not in the Hugging Face cache and the Hub cannot be reached")
        get = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(f"model {name!r} is not a local directory, and {why} (HF_HUB_OFFLINE={offline}). "
                                f"Download it where there is network (`{get}` fills the same cache) or pass a "
                                "local checkpoint directory instead.") from err
    return path


# ----------------------------------------------------------------------------------------------------------------
# An epoch's plan: samples packed into rows of a token budget, rows dealt to ranks and accumulation steps


def pack(lengths: list[int], max_tokens: int, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    """Best-fit-decreasing packing of sample indices into rows of <= max_tokens tokens (longer: a row of its own).
    A (seed, epoch) shuffle breaks ties and orders the rows; the row count is the same in every epoch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    rows, free = [], []  # free: sorted (remaining capacity, row) of rows that can still take tokens
    for i in order:
        j = bisect.bisect_left(free, (lengths[i], -1))  # the tightest row that fits
        if j < len(free):
            cap, r = free.pop(j)
        else:
            cap, r = max_tokens, len(rows)
            rows.append([])
        rows[r].append(i)
        if cap - lengths[i] > 0:
            bisect.insort(free, (cap - lengths[i], r))
    rng.shuffle(rows)
    return rows


def plan_epoch(lengths: list[int], max_tokens: int, world_size: int = 1, grad_accum: int = 1, seed: int = 0,
               epoch: int = 0) -> list[list[list[int]]]:
    """plan[step] = world_size * grad_accum micro-batches (rows of sample indices); rank r takes plan[step][r::W].
    The last step is filled up with the first rows: every rank runs as many micro-batches (no collective hangs)."""
    rows, per_step = pack(lengths, max_tokens, seed, epoch), world_size * grad_accum
    n_steps = -(-len(rows) // per_step)
    rows = rows + [rows[i % len(rows)] for i in range(n_steps * per_step - len(rows))]
    return [rows[s * per_step:(s + 1) * per_step] for s in range(n_steps)]


# ----------------------------------------------------------------------------------------------------------------
# During the run: stop when it goes wrong, log, and leave what a resumed run needs


class RunGuard:
    """Stops a run that went wrong before its weights are evaluated, saved or exported: a non-finite loss or gradient
    norm (with fp16 loss scaling an overflow is a skipped step instead, max_skips in a row), or more than
    max_empty_frac of the steps without any target token on any rank (samples failing at load, say)."""

    def __init__(self, max_skips: int, max_empty_frac: float, loss_scaled: bool, output_dir: str):
        self.max_skips, self.max_empty_frac, self.loss_scaled = max_skips, max_empty_frac, loss_scaled
        self.out = output_dir
        self.skips = self.seen_skips = self.empty = self.failed = 0
        self.last_good = "none saved yet"  # the newest resumable checkpoint

    def check(self, step: int, rec: dict, skipped_steps: int) -> str:
        """The step's record (loss, grad_norm, targets, load_failures) -> why the run must stop, or ""."""
        self.skips, self.seen_skips = self.skips + 1 if skipped_steps > self.seen_skips else 0, skipped_steps
        self.empty, self.failed = self.empty + (rec["targets"] == 0), self.failed + rec.get("load_failures", 0)
        if not math.isfinite(rec["loss"]) or not (self.loss_scaled or math.isfinite(rec["grad_norm"])):
            return self.stop(step, f"loss {rec['loss']}, gradient norm {rec['grad_norm']}: the run diverged")
        if self.skips > self.max_skips:
            return self.stop(step, f"{self.skips} steps in a row skipped for fp16 overflow (max_skipped_steps "
                                   f"{self.max_skips}): the run diverged")
        if self.empty > max(1, self.max_empty_frac * step):
            return self.stop(step, f"{self.empty} of {step} steps had no target token on any rank ({self.failed} "
                                   "samples failed to load; run python data.py check)")
        return ""

    def summary(self) -> str:  # for the closing log line
        return f" ({self.empty} steps without targets, {self.failed} samples failed to load)" if self.empty or \
            self.failed else ""

    def stop(self, step: int, why: str) -> str:
        best = f"; best model so far: {self.out}/best" if os.path.isdir(os.path.join(self.out, "best")) else ""
        return (f"step {step}: {why}. Stopped without writing final/. Last good checkpoint: {self.last_good}{best} "
                "(fix the cause, then resume)")


def loggers(cfg, rank: int) -> tuple:
    """(tensorboard writer, wandb run) when the config's `tensorboard` / `wandb_project` ask for them, rank 0 only."""
    tb = wb = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
    if rank == 0 and cfg.wandb_project:
        import wandb
        wb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    return tb, wb


def metrics_line(rec: dict) -> str:
    """One metrics.jsonl line in strict JSON: a NaN or infinite value is written as null and named in `nonfinite`."""
    bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    out = {k: None if k in bad else v for k, v in rec.items()}
    return json.dumps({**out, "nonfinite": bad} if bad else out, allow_nan=False) + "\n"


def _record(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def trim_metrics(path: str, step: int):
    """On resume from `step`: drop the records of later steps (the resumed run writes them again) and a torn line."""
    if os.path.exists(path):
        keep = [x for x in Path(path).read_text().splitlines(keepends=True)
                if x.endswith("\n") and isinstance(r := _record(x), dict) and r.get("step", 0) <= step]
        Path(path + ".tmp").write_text("".join(keep))
        os.replace(path + ".tmp", path)


def seed_all(seed: int):
    """A run's start: Python, numpy and torch (CPU and every CUDA device) draw from `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator a resumed run continues from: Python, numpy, torch CPU and this rank's CUDA device."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    return {**s, "cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def best_score(output_dir: str, value: float | None = None, step: int = 0) -> float | None:
    """output_dir/best.json: the eval score of the model in best/. With a value, record it (rank 0, after the export);
    without, read it (None if absent). A resumed run starts from the better of this and its checkpoint's record, so
    it never replaces best/ with a worse model (the checkpoint may predate the last export)."""
    path = os.path.join(output_dir, "best.json")
    if value is not None:
        Path(path + ".tmp").write_text(json.dumps({"value": value, "step": step}) + "\n")
        os.replace(path + ".tmp", path)
        return value
    return json.loads(Path(path).read_text())["value"] if os.path.exists(path) else None
