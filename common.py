"""The plumbing every stage shares (nanochat's common.py): config loading and the command line, distributed setup,
the epoch plan, the DeepSpeed engine's policy, optimizer, resumable checkpoints and exports, the guard that stops a run
gone wrong, and the run's records. It knows nothing of Ovis2.5 and imports no module of ours: the bottom of
common <- hub <- model <- tools <- scoring <- data <- the scripts."""

import bisect
import contextlib
import dataclasses
import errno
import importlib
import json
import math
import os
import random
import shutil
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

RECORD_FILE = "ovis_tune.json"  # beside an export's config.json: the budgets, tools, thinking it was trained with
LAST_SAVED = {"path": "none saved yet"}  # this process's newest resumable checkpoint (named when a run is stopped)

# ----------------------------------------------------------------------------------------------------------------
# Config: dataclass defaults <- `--config x.json` <- `--key=value`, and the command line around main()


class RunError(RuntimeError):
    """A run that must stop and say so (it diverged, or there is nothing to train on): exit non-zero, no final/."""


class ConfigError(ValueError):
    """A setting the user must fix (a typo, a JSON syntax error, a missing file): one line, never a traceback."""


def read_json(path: str, what: str = "config"):
    """A JSON file -> its value; a syntax error names the file, line and column (editors count from 1)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None


def check_choices(cfg):
    """Each Config's __post_init__: a field typed Literal[...] must hold one of its values (typos are errors)."""
    for k, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is typing.Literal and getattr(cfg, k) not in typing.get_args(tp):
            raise ConfigError(f"config key {k!r}: {getattr(cfg, k)!r} is not one of {list(typing.get_args(tp))}")


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
    raise ConfigError(f"config key {key!r}: {v!r} is not a {tp}")


def cli_pairs(argv: list[str]) -> list[tuple[str, str]]:
    """`--key=value` / `--key value` arguments -> [(key, value)]; dashes in a key read as underscores."""
    argv, out = list(argv), []
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --key=value")
        k, eq, v = arg[2:].partition("=")
        if not (eq or argv):
            raise ConfigError(f"--{k} needs a value")
        out.append((k.replace("-", "_"), v if eq else argv.pop(0)))
    return out


def load_config(cls, argv: list[str] | None = None):
    """cls() defaults <- `--config x.json` <- `--key=value`, parsed by the field's type. Unknown keys are errors; JSON
    keys starting with "_" are comments; deepspeed's --local_rank is ignored (LOCAL_RANK is in the environment)."""
    cli = cli_pairs(sys.argv[1:] if argv is None else argv)
    items = []
    for path in (p for c, p in cli if c == "config"):
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise ConfigError(f"config {path}: must be a JSON object of settings, not a {type(obj).__name__}")
        items += [(k, v) for k, v in obj.items() if not k.startswith("_")]
    items += [(k, v) for k, v in cli if k not in ("config", "local_rank")]
    names = [f.name for f in dataclasses.fields(cls)]
    for k, _ in items:
        if k not in names:
            raise ConfigError(f"unknown config key {k!r}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    cfg = cls(**{k: coerce(v, hints[k], k) for k, v in items})
    cfg.given = frozenset(k for k, _ in items)  # what the user set (hub.apply_record fills in only the rest)
    return cfg


def run_cli(main, cls, file: str):
    """`python x.py --config c.json --key=value` -> main(cfg). What the user must fix (a config mistake, a run that
    stopped) is one line `x.py: error: ...` with exit code 1; Ctrl-C names the last resumable checkpoint (exit 130)."""
    name = os.path.basename(file)
    try:
        main(load_config(cls))
    except (RunError, ConfigError, FileNotFoundError) as e:  # (a checkpoint, data or config file that is not there)
        sys.exit(f"{name}: error: {e}")
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{name}: interrupted. Last resumable checkpoint: {LAST_SAVED['path']} (run again with "
                  "--resume=auto to continue from it)", file=sys.stderr)
        sys.exit(130)


def import_object(path: str, key: str):
    """"pkg.mod:Name" or "pkg.mod.name" (a user's tool, scorer...) -> the object; an error names the config key."""
    mod, _, attr = path.rpartition(":" if ":" in path else ".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot import {path!r} ({type(e).__name__}: {e})") from None


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
               epoch: int = 0, fill: str = "repeat") -> list[list[list[int]]]:
    """plan[step] = world_size * grad_accum micro-batches (rows of sample indices); rank r takes plan[step][r::W].
    The last step is filled up so that every rank runs as many micro-batches (no collective hangs): with the first
    rows again ("repeat", training) or with empty rows ("empty", eval: every sample counts exactly once)."""
    rows, per_step = pack(lengths, max_tokens, seed, epoch), world_size * grad_accum
    n_steps = -(-len(rows) // per_step)
    extra = n_steps * per_step - len(rows)
    rows = rows + ([rows[i % len(rows)] for i in range(extra)] if fill == "repeat" else [[] for _ in range(extra)])
    return [rows[s * per_step:(s + 1) * per_step] for s in range(n_steps)]


# ----------------------------------------------------------------------------------------------------------------
# The engine: policy from a zero config, trainable parameters, optimizer; resumable checkpoints, exports


def engine_config(path: str, script: str, grad_accum: int, world: int, bf16: bool) -> dict:
    """A zero config (engine policy only) with what the script owns filled in: batch sizes (one packed row per
    micro-batch) and bf16. Optimizer and scheduler blocks are refused: the scripts build their own."""
    ds = read_json(path, "zero config")
    for k in ("optimizer", "scheduler"):
        if k in ds:
            raise ConfigError(f"{path}: remove {k!r}; {script} builds the optimizer and LR schedule itself")
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum,
              train_batch_size=grad_accum * world)
    ds["bf16"] = {"enabled": bf16}
    return ds


def longest_prefix_lr(chosen: list[tuple[str, float]]):
    """[(parameter-name prefix, lr)] ("" = every parameter) -> lr_of(name): the longest matching prefix wins."""
    def lr_of(name: str) -> float | None:
        lr = None
        for prefix, mod_lr in sorted(chosen, key=lambda x: len(x[0])):  # longest matching prefix last, so it wins
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                lr = mod_lr
        return lr
    return lr_of


def param_groups(model: torch.nn.Module, lr_of, weight_decay: float) -> list[dict]:
    """Each parameter trains at lr_of(name), or is frozen where that is None; AdamW groups by (lr, decay). Norm weights
    and biases (1-D) get no weight decay."""
    groups: dict = {}
    for name, p in model.named_parameters():
        lr = lr_of(name)
        p.requires_grad_(lr is not None)
        if lr is not None:
            groups.setdefault((lr, 0.0 if p.ndim < 2 else weight_decay), []).append(p)
    if not groups:
        raise ConfigError("nothing would train: no parameter is selected")
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def optimizer(groups: list[dict], ds_config: dict, lr: float, betas: tuple) -> torch.optim.Optimizer:
    """AdamW over the groups; ZeRO-Offload to CPU takes DeepSpeed's CPU Adam unless the zero config opts out with
    "zero_force_ds_cpu_optimizer": false (then torch's AdamW steps on the CPU copy)."""
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
    if offload and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available() and not offload)


@contextlib.contextmanager
def saving(path: str):
    """Around every write of a checkpoint, export or record under `path`: a full disk is named as such, whichever layer
    noticed it (Python's ENOSPC, torch.save's C++ stream error, safetensors' I/O error), never a bare stream error."""
    try:
        yield
    except Exception as e:
        where = Path(path).absolute()
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 16 * 2**20:
            raise RunError(f"no space left on {where} ({free / 2**20:.1f} MiB free) while writing {path}. Earlier "
                           f"checkpoints are intact (last resumable checkpoint: {LAST_SAVED['path']}); free some "
                           "space or choose another output_dir, then resume") from e
        raise


def save_resumable(engine, output_dir: str, step: int, state: dict, keep_last: int, rank: int,
                   exclude_frozen: bool = False) -> str:
    """output_dir/checkpoints/stepNNNNNNN: engine state + `state` + step + RNG. `latest` flips (atomically) only once
    every rank wrote its shard; a failed write removes its half-written dir, so `latest` always names a whole one."""
    import torch.distributed as dist

    ckpt, tag = os.path.join(output_dir, "checkpoints"), f"step{step:07d}"
    client = {**state, "step": step, "rng": rng_state()}
    failed = None
    try:
        with saving(os.path.join(ckpt, tag)):
            engine.save_checkpoint(ckpt, tag=tag, client_state=client, save_latest=False,
                                   exclude_frozen_parameters=exclude_frozen)
    except Exception as e:  # (every rank must learn of it: the others would wait at the collective below)
        failed = e
        shutil.rmtree(os.path.join(ckpt, tag), ignore_errors=True)
    all_wrote(failed, engine.device, f"checkpoint {ckpt}/{tag}")
    if rank == 0:
        with saving(ckpt):
            Path(ckpt, "latest.tmp").write_text(tag)
            os.replace(os.path.join(ckpt, "latest.tmp"), os.path.join(ckpt, "latest"))
        for old in sorted(d for d in os.listdir(ckpt) if d.startswith("step"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt, old), ignore_errors=True)
    dist.barrier()
    LAST_SAVED["path"] = os.path.join(ckpt, tag)
    return LAST_SAVED["path"]


def all_wrote(failed: "Exception | None", device, what: str):
    """After a write some ranks do: every rank learns whether all succeeded (a collective standing in for the barrier),
    so none waits for a rank that stopped; the one that failed raises its own error, the others name `what`."""
    import torch.distributed as dist

    ok = torch.tensor(float(failed is None), device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if failed is not None or not ok.item():
        raise failed or RunError(f"another rank could not write {what} (its error says why)")


def resume(engine, spec: str, output_dir: str, state: dict, log, strict: bool = True) -> tuple[int, dict]:
    """`resume` = "" (fresh), "auto" (output_dir/checkpoints/latest, fresh if none) or a checkpoint dir -> (step, the
    saved state: `state`'s keys, a key the checkpoint lacks keeps its value). Engine state and RNG are restored and
    metrics.jsonl loses the records after the checkpoint (those steps run, and are logged, again)."""
    LAST_SAVED["path"] = "none saved yet"  # (a process may run several runs: tests, notebooks)
    if not spec:
        return 0, state
    ckpt = os.path.join(output_dir, "checkpoints") if spec == "auto" else os.path.dirname(spec.rstrip("/"))
    tag = None if spec == "auto" else os.path.basename(spec.rstrip("/"))
    if spec == "auto" and os.path.exists(os.path.join(ckpt, "latest")):
        tag = Path(ckpt, "latest").read_text().strip()
    if tag is None:
        log("resume=auto: no checkpoint yet, starting fresh")
        return 0, state
    _, client = engine.load_checkpoint(ckpt, tag=tag, load_module_strict=strict)  # LoRA: the frozen base not saved
    if client is None:
        raise FileNotFoundError(f"could not load checkpoint {ckpt}/{tag}")
    set_rng_state(client["rng"])
    if int(os.environ.get("RANK", "0")) == 0:
        trim_metrics(os.path.join(output_dir, "metrics.jsonl"), client["step"])
    LAST_SAVED["path"] = os.path.join(ckpt, tag)
    log(f"resumed from {ckpt}/{tag} at step {client['step']}")
    return client["step"], {**state, **{k: client[k] for k in state if k in client}}


def export_model(engine, model, out_dir: str, rank: int, record: dict):
    """A deployable checkpoint (model.save_pretrained: the official layout) with its training record. Under ZeRO-3 the
    weights are gathered first: a collective, every rank calls this."""

    z3 = engine.zero_optimization_stage() == 3
    sd = engine._zero3_consolidated_16bit_state_dict() if z3 else engine.module.state_dict() if rank == 0 else None
    failed = None
    if rank == 0:  # (only the writer cleans up: another rank's rmtree would race its write)
        try:
            with saving(out_dir):
                model.save_pretrained(out_dir, state_dict=sd, record=record)
        except Exception as e:  # (every rank must learn of it)
            failed = e
        finally:
            shutil.rmtree(out_dir + ".tmp", ignore_errors=True)  # what a failed save left
    all_wrote(failed, engine.device, out_dir)


def export_adapter(engine, peft_model, out_dir: str, rank: int, record: dict):
    """The adapter in the standard peft layout (base recorded in adapter_config.json) with the training record, into a
    temp dir renamed at the end. Under ZeRO-3 only the trainable parameters are gathered (a collective)."""
    import deepspeed

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    failed = None
    with deepspeed.zero.GatheredParameters(trainable, enabled=engine.zero_optimization_stage() == 3):
        if rank == 0:  # (only the writer cleans up: another rank's rmtree would race its write)
            try:
                with saving(out_dir):
                    shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
                    peft_model.save_pretrained(out_dir + ".tmp", save_embedding_layers=False)
                    Path(out_dir + ".tmp", RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
                    shutil.rmtree(out_dir, ignore_errors=True)
                    os.replace(out_dir + ".tmp", out_dir)
            except Exception as e:  # (every rank must learn of it)
                failed = e
            finally:
                shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
    all_wrote(failed, engine.device, out_dir)


# ----------------------------------------------------------------------------------------------------------------
# During the run: stop when it goes wrong, log, and leave what a resumed run needs


class RunGuard:
    """Stops a run gone wrong before its weights are evaluated, saved or exported:
    - diverged: a non-finite loss or gradient norm (with fp16 loss scaling an overflow is a skipped step instead,
      max_skips in a row), or a loss above max_loss_ratio x its start (the first 3 steps' mean) max_dead steps in a row;
    - died finite: max_dead steps in a row with target tokens but a gradient norm of exactly 0 (saturated weights;
      uniform logits give loss ln(vocab)), which a run that still learns never shows;
    - starved: more than max_empty_frac of the steps without a target token on any rank (`empty_why` says why: samples
      failing at load; in GRPO no group whose rewards vary, so no learning signal); checked from the second such
      step on, and at the last step (`total_steps`) for any count, so that even a one-step run never ends "done"
      without having trained."""

    def __init__(self, max_skips: int, max_empty_frac: float, loss_scaled: bool, output_dir: str, max_dead: int = 3,
                 max_loss_ratio: float = 0.0, vocab_size: int = 0, empty_why: str = "", total_steps: int = 0):
        self.max_skips, self.max_empty_frac, self.loss_scaled = max_skips, max_empty_frac, loss_scaled
        self.total_steps = total_steps  # the run's last step (0: unknown)
        self.max_dead, self.max_loss_ratio, self.vocab_size = max_dead, max_loss_ratio, vocab_size
        self.out = output_dir
        self.empty_why = empty_why or "had no target token on any rank ({failed} samples failed to load; run python " \
                                      "data.py check)"
        self.skips = self.seen_skips = self.empty = self.failed = self.dead = self.high = 0
        self.start: list[float] = []  # the first steps' losses: where the run began
        self.last_good = "none saved yet"  # the newest resumable checkpoint

    def check(self, step: int, rec: dict, skipped_steps: int) -> str:
        """The step's record (loss, grad_norm, targets, load_failures) -> why the run must stop, or ""."""
        skipped = skipped_steps > self.seen_skips
        self.skips, self.seen_skips = self.skips + 1 if skipped else 0, skipped_steps
        self.empty, self.failed = self.empty + (rec["targets"] == 0), self.failed + rec.get("load_failures", 0)
        loss, norm = rec["loss"], rec["grad_norm"]
        if not math.isfinite(loss) or not (self.loss_scaled or math.isfinite(norm)):
            return self.stop(step, f"loss {loss}, gradient norm {norm}: the run diverged")
        if self.skips > self.max_skips:
            return self.stop(step, f"{self.skips} steps in a row skipped for fp16 overflow (max_skipped_steps "
                                   f"{self.max_skips}): the run diverged")
        self.dead = self.dead + 1 if rec["targets"] > 0 and norm == 0 and not skipped else 0
        if self.max_dead and self.dead >= self.max_dead:
            uniform = abs(loss - math.log(self.vocab_size)) < 1e-3 if self.vocab_size else False
            return self.stop(step, f"gradient norm 0 on {self.dead} steps in a row with {rec['targets']} target tokens "
                                   f"(loss {loss:.4f}{f' = ln(vocab {self.vocab_size}): uniform logits' * uniform}): "
                                   "the weights saturated and nothing trains any more; the run died (learning rate "
                                   "too high?)")
        if rec["targets"] > 0 and len(self.start) < 3:
            self.start.append(loss)
        ref = sum(self.start) / len(self.start) if len(self.start) == 3 else math.inf
        self.high = self.high + 1 if self.max_loss_ratio > 0 and loss > self.max_loss_ratio * ref else 0
        if self.max_dead and self.high >= self.max_dead:
            return self.stop(step, f"loss {loss:.4f} above {self.max_loss_ratio:g}x its start ({ref:.4f}, the first 3 "
                                   f"steps' mean) on {self.high} steps in a row: the run diverged")
        last = step == self.total_steps
        if self.empty > (self.max_empty_frac * step if last else max(1, self.max_empty_frac * step)):
            return self.stop(step, f"{self.empty} of {step} steps " + self.empty_why.format(failed=self.failed))
        return ""

    def state_dict(self) -> dict:  # what a resumed run continues from (saved in the checkpoint's state)
        return {"start": self.start, "empty": self.empty, "failed": self.failed, "dead": self.dead, "high": self.high}

    def load_state_dict(self, s: dict, skipped_steps: int):
        self.start, self.empty, self.failed = list(s.get("start", [])), s.get("empty", 0), s.get("failed", 0)
        self.dead, self.high = s.get("dead", 0), s.get("high", 0)  # streaks in progress go on after a resume
        self.seen_skips, self.last_good = skipped_steps, LAST_SAVED["path"]

    def summary(self) -> str:  # for the closing log line
        return f" ({self.empty} steps without targets, {self.failed} samples failed to load)" if self.empty or \
            self.failed else ""

    def stop(self, step: int, why: str) -> str:
        best = f"; best model so far: {self.out}/best" if os.path.isdir(os.path.join(self.out, "best")) else ""
        return (f"step {step}: {why}. Stopped without writing final/. Last good checkpoint: {self.last_good}{best} "
                "(fix the cause, then resume)")


class Metrics:
    """Rank 0's record of the run: metrics.jsonl (strict JSON, one line per record) and tensorboard / wandb when the
    config asks for them. On the other ranks, and for whatever is off, every call does nothing."""

    def __init__(self, cfg, rank: int, scalar_prefix: str = "train"):
        on = rank == 0
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl") if on else None
        self.prefix, self.tb, self.wb = scalar_prefix, None, None
        if on and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        if on and cfg.wandb_project:
            import wandb
            self.wb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))

    def write(self, rec: dict):
        if self.path is None:
            return
        with saving(self.path), open(self.path, "a") as f:
            f.write(metrics_line(rec))  # strict JSON: NaN / inf become null, named in "nonfinite"
        for k, v in rec.items():
            if self.tb is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{self.prefix}/{k}", v, rec["step"])
        if self.wb is not None:
            self.wb.log(rec, step=rec["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


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


def write_run_config(cfg, output_dir: str):
    """output_dir/config.json: the run's settings, written once the run has started (a relaunch that fails its checks
    never replaces the recorded config), through a temp file."""
    path = os.path.join(output_dir, "config.json")
    with saving(path):
        Path(path + ".tmp").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
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


def read_best(output_dir: str) -> float | None:
    """output_dir/best.json: the eval score of the model in best/ (None: no best/ yet). A resumed run starts from the
    better of this and its checkpoint's record, so it never replaces best/ with a worse model (the checkpoint may
    predate the last export)."""
    path = os.path.join(output_dir, "best.json")
    return json.loads(Path(path).read_text())["value"] if os.path.exists(path) else None


def write_best(output_dir: str, value: float, step: int):
    """Record best/'s score (rank 0, after the export), through a temp file."""
    path = os.path.join(output_dir, "best.json")
    with saving(path):
        Path(path + ".tmp").write_text(json.dumps({"value": value, "step": step}) + "\n")
        os.replace(path + ".tmp", path)
