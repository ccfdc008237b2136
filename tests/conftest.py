"""Shared test fixtures. Only repo-relative paths: the tokenizer in assets/, images and data under tests/fixtures."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen3/Ovis2.5 tokenizer; building the fast tokenizer from vocab+merges takes seconds: load once."""
    import data

    return data.load_tokenizer(str(ROOT / "assets" / "tiny"))


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny random Ovis2.5 saved in the official layout with the real tokenizer files: a run's model_path."""
    import model as M

    d = tmp_path_factory.mktemp("base") / "tiny"
    torch.manual_seed(0)
    m = M.Ovis25.from_config(json.loads((ROOT / "assets" / "tiny" / "config.json").read_text()))
    m.save_pretrained(str(d), source_dir=str(ROOT / "assets" / "tiny"))
    return str(d)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """10 mixed samples of different lengths: Crop calls with inline images, Identify calls, text-only, thinking."""
    demo = json.loads((ROOT / "data" / "demo" / "sft.json").read_text())
    seed = json.loads((ROOT / "data" / "demo" / "seed_samples.json").read_text())
    p = tmp_path_factory.mktemp("data") / "small.json"
    p.write_text(json.dumps(demo[:6] + seed))
    return str(p)
