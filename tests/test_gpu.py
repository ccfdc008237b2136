"""On a CUDA GPU (skipped elsewhere): torch's varlen kernel against SDPA, eager and its CPU reference on packed rows
of multimodal samples, packed == separate, and one sft.py step's loss on the varlen path against the SDPA path.
Run: `python -m pytest -q tests/test_gpu.py` on a GPU machine; `python bench.py gpu` measures the rest."""

import json

import pytest
import torch

import data
import model as M
import sft
from _util import DEMO, ROOT, cfg_for, metrics, varlen_reference

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("world_one")]  # one process group for in-process engines (conftest)
CFG = json.loads((ROOT / "assets" / "tiny" / "config.json").read_text())
PX = dict(single_image_min_pixels=4096, single_image_max_pixels=20480, crop_min_pixels=4096, crop_max_pixels=8192)


def _models() -> dict:
    torch.manual_seed(0)
    ref = M.Ovis25.from_config(CFG, attn_implementation="sdpa")
    out = {}
    for attn in ("varlen", "sdpa", "eager"):
        m = M.Ovis25.from_config(CFG, attn_implementation=attn)
        m.load_state_dict(ref.state_dict())
        out[attn] = m.to("cuda", torch.bfloat16).eval()
    return out


def test_varlen_kernel_equals_reference_sdpa_and_eager(tokenizer):
    assert M.attention_paths("", "cuda", torch.bfloat16, flash=False)["llm"] == "torch varlen"
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 40, 64], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(64, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    got = M._torch_varlen()(q, k, v, cu, cu, 34, 34, window_size=(-1, 0), enable_gqa=True)
    want = varlen_reference(q.float(), k.float(), v.float(), cu, cu, 34, 34, window_size=(-1, 0), enable_gqa=True)
    assert (got.float() - want).abs().max() < 2e-2
    samples = json.loads((DEMO / "sft.json").read_text())[:4] + json.loads((DEMO / "seed_samples.json").read_text())
    enc = [data.encode_sample(s, tokenizer, DEMO, **PX) for s in samples[:6]]
    mb = data.collate([enc[:3], enc[3:]])  # two packed rows of mixed lengths, images and text
    kw = {k: (mb[k].cuda() if mb[k] is not None else None) for k in ("pixel_values", "grid_thws", "position_ids")}
    models = _models()
    with torch.no_grad():
        logits = {a: m(mb["input_ids"].cuda(), **kw).logits.float() for a, m in models.items()}
        for other in ("sdpa", "eager"):
            diff = (logits["varlen"] - logits[other]).abs().max().item()
            agree = (logits["varlen"].argmax(-1) == logits[other].argmax(-1)).float().mean().item()
            assert diff < 0.1 and agree > 0.98, (other, diff, agree)
        alone = models["varlen"](enc[0]["input_ids"][None].cuda(), pixel_values=enc[0]["pixel_values"].cuda(),
                                 grid_thws=enc[0]["grid_thws"].cuda()).logits.float()[0]
        n = len(enc[0]["input_ids"])
        assert (logits["varlen"][0, :n] - alone).abs().max() < 0.1  # packed == separate


def test_sft_step_loss_varlen_equals_sdpa(base, small_data, tmp_path):
    losses = {}
    for attn in ("varlen", "sdpa"):
        out = tmp_path / attn
        sft.main(sft.Config(**cfg_for(base, small_data, out, attn_implementation=attn, bf16=True, max_steps=2,
                                      zero_config=str(ROOT / "zero_configs" / "zero0.json"))))
        losses[attn] = [r["loss"] for r in metrics(out)]
    assert all(abs(a - b) <= 2e-2 * abs(b) for a, b in zip(losses["varlen"], losses["sdpa"])), losses
