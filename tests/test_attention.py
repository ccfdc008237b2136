"""Attention dispatch, the parts a CPU can check: cu_seqlens from packed position ids and from ViT segments, the
decision table, the varlen contract's CPU reference, and the model running its varlen path (with the reference
standing in for the CUDA kernel) to the same logits as SDPA. tests/test_gpu.py checks the real kernel."""

import json

import pytest
import torch

import model as M
from _util import ROOT, varlen_reference

CFG = json.loads((ROOT / "assets" / "tiny" / "config.json").read_text())


def test_cu_seqlens_from_packed_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2]])  # row 2: a sample, then padding
    cu, longest = M.varlen_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 8, 13, 16] and longest == 5 and cu.dtype == torch.int32
    assert M.varlen_seqlens(torch.tensor([[0, 0, 0, 1]]))[0].tolist() == [0, 1, 2, 4]  # one-token samples
    cu, longest = M.varlen_seqlens(torch.arange(6)[None].expand(2, -1))  # a plain batch: one segment a row
    assert cu.tolist() == [0, 6, 12] and longest == 6


def test_cu_seqlens_from_vit_segments_full_and_windowed():
    vit = M.Ovis25.from_config(CFG).visual_tokenizer.vit.vision_model  # window 64 px: 2x2 merged cells a window
    grids = torch.tensor([[1, 4, 6], [2, 2, 2]])  # an image of 4x6 patches, a 2-frame video of 2x2
    for windowed, sizes in ((False, [24, 4, 4]), (True, [16, 8, 4, 4])):
        seg = M._segments(vit.segment_ids(grids, windowed, "cpu"))
        assert (seg["cu_seqlens"][1:] - seg["cu_seqlens"][:-1]).tolist() == sizes and seg["max_len"] == max(sizes)
        ids = vit.segment_ids(grids, windowed, "cpu")[seg["order"]]  # in `order`, each segment is contiguous
        assert all(len(set(ids[a:b].tolist())) == 1 for a, b in zip(seg["cu_seqlens"][:-1], seg["cu_seqlens"][1:]))


def test_dispatch_decision_table(monkeypatch):
    cpu, gpu, bf16, fp32 = "cpu", "cuda", torch.bfloat16, torch.float32
    table = [  # (requested, device, dtype, flash-attn installed) -> llm, vit, generation
        ("", cpu, fp32, False, ("sdpa", "sdpa", "sdpa")), ("", cpu, bf16, False, ("sdpa", "sdpa", "sdpa")),
        ("", gpu, fp32, False, ("sdpa", "sdpa", "sdpa")),
        ("", gpu, bf16, False, ("torch varlen", "torch varlen", "sdpa")),
        ("varlen", gpu, torch.float16, True, ("torch varlen", "torch varlen", "sdpa")),
        ("", gpu, bf16, True, ("flash_attention_2", "flash_attn varlen", "flash_attention_2")),
        ("sdpa", gpu, bf16, False, ("sdpa", "sdpa", "sdpa")), ("eager", gpu, bf16, True, ("eager", "sdpa", "eager")),
        ("flex_attention", gpu, bf16, False, ("flex_attention", "sdpa", "flex_attention"))]
    for req, dev, dt, flash, want in table:
        got = M.attention_paths(req, dev, dt, flash=flash)
        assert (got["llm"], got["vit"], got["generation"]) == want, (req, dev, dt, flash)
    with pytest.raises(ValueError, match="attn_implementation: 'flash'; choose from"):
        M.attention_paths("flash", cpu, fp32)
    monkeypatch.setattr(M, "_torch_varlen", lambda: None)  # torch < 2.9: no varlen kernel, SDPA as before
    assert M.attention_paths("", gpu, bf16, flash=False)["llm"] == "sdpa"


def test_varlen_reference_is_masked_attention():
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)  # GQA: 4 query heads, 2 kv heads
    seg = torch.repeat_interleave(torch.arange(3), cu[1:] - cu[:-1])
    same = seg[:, None] == seg[None, :]
    for causal in (False, True):
        mask = same & torch.ones(9, 9, dtype=torch.bool).tril() if causal else same
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
            attn_mask=mask).transpose(0, 1)
        got = varlen_reference(q, k, v, cu, cu, 5, 5, window_size=(-1, 0) if causal else (-1, -1), enable_gqa=True)
        assert torch.allclose(got, dense, atol=1e-6)


def test_model_varlen_path_equals_sdpa(monkeypatch, tokenizer):
    """The varlen plumbing (cu_seqlens from the packed rows' position ids, GQA, causal, the ViT's segments) run on CPU
    with the reference in place of the CUDA kernel: the same logits and loss as the SDPA path; decoding with the KV
    cache stays on SDPA."""
    import data

    calls = []

    def kernel(t):
        return lambda *a, **k: calls.append(len(a[3])) or varlen_reference(*a, **k)

    torch.manual_seed(0)
    sdpa = M.Ovis25.from_config(CFG, attn_implementation="sdpa").eval()
    ours = M.Ovis25.from_config(CFG, attn_implementation="varlen").eval()
    ours.load_state_dict(sdpa.state_dict())
    assert ours.config.llm._attn_implementation == "ovis_varlen"
    samples = json.loads((ROOT / "data" / "demo" / "sft.json").read_text())[:3]
    px = dict(single_image_min_pixels=4096, single_image_max_pixels=8192, crop_min_pixels=4096, crop_max_pixels=8192)
    enc = [data.encode_sample(s, tokenizer, ROOT / "data" / "demo", **px) for s in samples]
    mb = data.collate([[enc[0], enc[1]], [enc[2]]])  # two packed rows, the second padded
    args = dict(pixel_values=mb["pixel_values"], grid_thws=mb["grid_thws"], position_ids=mb["position_ids"])
    monkeypatch.setattr(M, "_varlen_kernel", kernel)
    with torch.no_grad():
        want, got = sdpa(mb["input_ids"], **args).logits, ours(mb["input_ids"], **args).logits
        assert calls and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        lw = sdpa(mb["input_ids"], labels=mb["labels"], **args).loss
        assert torch.allclose(ours(mb["input_ids"], labels=mb["labels"], **args).loss, lw, atol=1e-6)
        n = len(calls)
        ids = mb["input_ids"][:1, :40]
        assert torch.equal(ours.generate(ids, max_new_tokens=5), sdpa.generate(ids, max_new_tokens=5))
        # an unpadded prefill is one causal segment a row (varlen, one call per layer); decoding steps use SDPA
        assert calls[n:] == [2] * CFG["llm_config"]["num_hidden_layers"]
