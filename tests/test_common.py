"""common.py: config precedence and typing, distributed setup in one process, the epoch plan, metrics lines, resume
state, the run guard."""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

import common


@dataclass
class Cfg:
    lr: float = 1e-5
    steps: int = 10
    name: str = "run"
    flag: bool = False
    out: str | None = "out"
    ratio: float | None = 0.5
    mods: list = field(default_factory=list)
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        common.check_choices(self)


def test_load_config(tmp_path):
    assert common.load_config(Cfg, []) == Cfg()
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"lr": 2e-5, "steps": 20, "name": "a", "_comment": "ignored"}))
    cfg = common.load_config(Cfg, ["--steps=30", "--config", str(p), "--flag=true", "--local_rank=3", "--out", "none",
                                   "--name=7", "--ratio=1", "--mods=[1, 2]", "--mode", "b"])
    assert cfg == Cfg(lr=2e-5, steps=30, name="7", flag=True, out=None, ratio=1.0, mods=[1, 2], mode="b")
    for bad in (["--nope=1"], ["--steps=abc"], ["--flag=maybe"], ["--steps=1.5"], ["stray"], ["--lr"]):
        with pytest.raises(ValueError):
            common.load_config(Cfg, bad)
    with pytest.raises(ValueError, match=r"config key 'mode': 'c' is not one of \['a', 'b'\]"):
        common.load_config(Cfg, ["--mode=c"])
    p.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        common.load_config(Cfg, ["--config", str(p)])


def test_setup_distributed_single_process():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    code = "import common, torch.distributed as d; print(common.setup_distributed(60), d.is_initialized())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0 and "(0, 1, 0) True" in r.stdout, r.stderr[-2000:]


def test_pack_and_plan():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(400)] + [1000]
    rows = common.pack(lengths, 512, seed=1, epoch=0)
    assert rows == common.pack(lengths, 512, seed=1, epoch=0) and rows != common.pack(lengths, 512, seed=1, epoch=1)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths))) and [400] in rows
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows if r != [400])
    assert sum(lengths) / (512 * len(rows)) > 0.9 and len(rows) == len(common.pack(lengths, 512, seed=1, epoch=1))
    plan = common.plan_epoch(lengths, 512, world_size=3, grad_accum=2, seed=1, epoch=0)
    assert len(plan) == math.ceil(len(rows) / 6) and all(len(step) == 6 for step in plan)
    per_rank = [[mb for step in plan for mb in step[r::3]] for r in range(3)]
    assert len({len(m) for m in per_rank}) == 1 and {i for m in per_rank for mb in m for i in mb} == set(range(401))


def test_metrics_lines_are_strict_json_and_trimmed_on_resume(tmp_path):
    line = common.metrics_line({"step": 3, "loss": math.nan, "lr": 1e-5, "gn": math.inf})
    assert json.loads(line) == {"step": 3, "loss": None, "lr": 1e-5, "gn": None, "nonfinite": ["loss", "gn"]}
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(common.metrics_line({"step": s}) for s in (1, 2, 3)) + '{"step": 4, "lo')  # torn line
    common.trim_metrics(str(path), 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_resume_state(tmp_path):
    assert common.read_best(str(tmp_path)) is None
    common.write_best(str(tmp_path), 0.25, step=7)
    assert common.read_best(str(tmp_path)) == 0.25
    assert json.loads((tmp_path / "best.json").read_text()) == {"value": 0.25, "step": 7}
    common.seed_all(3)
    first = (random.random(), torch.rand(2).tolist())
    common.seed_all(3)
    assert (random.random(), torch.rand(2).tolist()) == first
    s = common.rng_state()
    a = (random.random(), torch.rand(2).tolist())
    common.set_rng_state(s)
    assert (random.random(), torch.rand(2).tolist()) == a


def test_run_guard_says_why_and_where_to_resume(tmp_path):
    g = common.RunGuard(max_skips=2, max_empty_frac=0.5, loss_scaled=False, output_dir=str(tmp_path))
    ok = {"loss": 1.0, "grad_norm": 1.0, "targets": 5}
    assert g.check(1, ok, 0) == ""
    g.last_good = "out/ckpt/step_1"
    why = g.check(2, {**ok, "grad_norm": math.inf}, 0)
    assert why.startswith("step 2: loss 1.0, gradient norm inf: the run diverged") and "out/ckpt/step_1" in why
    fp16 = common.RunGuard(max_skips=1, max_empty_frac=1.0, loss_scaled=True, output_dir=str(tmp_path))
    assert fp16.check(1, {**ok, "grad_norm": math.inf}, 1) == ""  # one overflow skip is loss scaling at work
    assert "2 steps in a row skipped" in fp16.check(2, ok, 2)
    empty = common.RunGuard(max_skips=0, max_empty_frac=0.25, loss_scaled=False, output_dir=str(tmp_path))
    assert [bool(empty.check(s, {**ok, "targets": 0, "load_failures": 3}, 0)) for s in (1, 2)] == [False, True]
