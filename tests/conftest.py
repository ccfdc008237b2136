"""Shared test fixtures. Only repo-relative paths: the tokenizer in assets/, images and data under tests/fixtures."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def world_one():
    """One process group (one rank) for every in-process engine of the session: DeepSpeed caches its groups, and
    re-creating them breaks it. Modules that run engines in process use it (`pytestmark`)."""
    import common

    common.setup_distributed(120)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen3/Ovis2.5 tokenizer; building the fast tokenizer from vocab+merges takes seconds: load once."""
    import model as M

    return M.load_tokenizer(str(ROOT / "assets" / "tiny"))


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


@pytest.fixture(scope="session")
def tool_ckpt(tmp_path_factory, tokenizer):
    """A tiny Ovis2.5 that learned one Crop conversation (GRPO demo prompt 0) (AdamW in process, ~15 s), saved in the
    official layout: a policy whose rollouts really call the Crop tool."""
    import data
    import model as M

    demo = ROOT / "data" / "demo"
    prompt = json.loads((demo / "grpo.json").read_text())[0]  # the GRPO demo's first prompt, same image as sft[0]
    answer = json.loads((demo / "sft.json").read_text())[0]["conversations"][-1]
    sample = {"id": prompt["id"], "image": prompt["image"], "conversations": prompt["conversations"] + [answer]}
    enc = data.encode_sample(sample, tokenizer, str(demo), single_image_min_pixels=4096, single_image_max_pixels=8192,
                             crop_min_pixels=4096, crop_max_pixels=8192)
    torch.manual_seed(0)
    m = M.Ovis25.from_config(json.loads((ROOT / "assets" / "tiny" / "config.json").read_text())).train()
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(300):
        loss = m(enc["input_ids"][None], labels=enc["labels"][None], pixel_values=enc["pixel_values"],
                 grid_thws=enc["grid_thws"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    d = tmp_path_factory.mktemp("tool_model") / "ckpt"
    m.save_pretrained(str(d), source_dir=str(ROOT / "assets" / "tiny"))
    return str(d)
