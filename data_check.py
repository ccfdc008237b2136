"""`python data.py check`: a run's data, as that run would read it (every image decoded), one line per bad sample
naming its file, line, id and field, then totals. Built on data.py (the same SFTDataset and prompt loader a run
uses), kept apart so that data.py stays the data path itself."""

import os
import sys
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import common
import model as ovis
import tools
from data import Budgets, SampleError, SFTDataset, load_prompts


def check(argv: list[str]) -> int:
    """`python data.py check (--config run.json | --data a.json,b.json) [--image_dir DIR] [--tokenizer DIR]
    [--key=value]`: decode every image, print one line per bad sample, then totals; 1 if any sample is bad. With a run
    config its data (eval files under eval_image_dir), budgets and tools are used, --key=value overriding them, so what
    is reported bad is what that run would drop; a GRPO config's files are checked as the prompts grpo.py loads."""
    cli = dict(common.cli_pairs(argv))
    run = common.read_json(cli.pop("config")) if "config" in cli else {}
    files, tok = cli.pop("data", None), cli.pop("tokenizer", None)
    hints, known = {f.name: f.type for f in fields(Budgets)}, ("image_dir", "eval_image_dir", "bbox_format", "tools")
    for k, v in cli.items():
        if k not in hints and k not in known:
            raise ValueError(f"unknown option --{k}; options: --config --data --tokenizer --{' --'.join(known)} "
                             f"and the budgets --{' --'.join(hints)}")
        run[k] = common.coerce(v, hints[k], k) if k in hints else v
    img, ev_img = run.get("image_dir", "."), run.get("eval_image_dir") or run.get("image_dir", ".")
    groups = [(files, img)] if files else [(run.get("data_path"), img), (run.get("eval_data_path"), ev_img)]
    groups = [([f for f in str(fs).split(",") if f], d) for fs, d in groups if fs]  # (files, their image dir)
    if not groups:
        raise ValueError("give --data or a --config with data_path")
    if "rewards" in run or "num_generations" in run:  # a GRPO config: prompts (image + question), not conversations
        try:
            print(f"prompts {sum(len(load_prompts(fs, d, run.get('bbox_format', 'pixel'))) for fs, d in groups)}: ok")
            return 0
        except (SampleError, common.RunError) as e:
            print(f"BAD {e}")
            return 1
    local = os.path.isfile(os.path.join(run.get("model_path", ""), "config.json"))  # its geometry, as the run's
    tok = ovis.load_tokenizer(tok or (run["model_path"] if local else
                                      str(Path(__file__).parent / "assets" / "tiny")))  # every Ovis2.5 shares it
    geometry = ovis.read_config(run["model_path"]).geometry if local else {}  # else model.py's defaults (16 / 2)
    registry = tools.load_tools(run.get("tools", "Crop|Identify"), run.get("bbox_format", "pixel"))
    sets = [SFTDataset(fs, tok, d, log=lambda *_: None, decode=True, registry=registry, **geometry,
                       budgets=replace(Budgets(), **{k: v for k, v in run.items() if k in hints}))
            for fs, d in groups]
    errors = [e for ds in sets for e in ds.errors]
    for e in sorted(errors, key=lambda e: (str(e.file), e.index if isinstance(e.index, int) else -1)):
        print(f"BAD {e}")
    q, n_ok = sorted(n for ds in sets for n in ds.lengths) or [0], sum(map(len, sets))
    stats = sum((ds.stats for ds in sets), Counter())
    print(f"samples {n_ok + len(errors)}: ok {n_ok}, bad {len(errors)}, over-long "
          f"{sum(ds.skipped['over-long'] for ds in sets)} | {', '.join(f'{k} {v}' for k, v in stats.items())}")
    print("tokens per sample:", *(f"p{p} {q[min(len(q) - 1, p * len(q) // 100)]}" for p in (50, 90, 99)), "max", q[-1])
    return 1 if errors else 0


def cli(argv: list[str]):
    """`python data.py check ...` (or `python data_check.py ...`): exit code 1 if any sample is bad."""
    if argv[:1] == ["check"]:
        argv = argv[1:]
    try:
        sys.exit(check(argv))
    except ValueError as e:
        sys.exit(f"data.py check: error: {e}")


if __name__ == "__main__":
    cli(sys.argv[1:])
