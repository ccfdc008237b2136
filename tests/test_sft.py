"""sft.py on real DeepSpeed engines (CPU, gloo): in-process single-rank runs and 2-rank runs through the launchers.
All fp32 so that equalities are tight."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import model as M
import sft
import tools
from _util import DEMO, ROOT, cfg_for, check_export, launch, metrics

pytestmark = pytest.mark.usefixtures("world_one")  # one process group for in-process engines (conftest)


def run_inprocess(cfg: dict):
    return sft.main(sft.Config(**cfg))


# ---------------------------------------------------------------------------------------------------------------


def test_config_errors_are_clear(base, small_data, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        common.load_config(sft.Config, ["--lrr=1e-5"])
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 1e-4, "max_tokns": 10}))
    with pytest.raises(ValueError, match="max_tokns"):
        common.load_config(sft.Config, ["--config", str(cfg_file)])
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"lr": 1e-4, "max_tokens": 10, "_comment": "ignored"}))
    c = common.load_config(sft.Config, ["--config", str(good), "--lr=3e-5", "--local_rank=0", "--bf16", "false"])
    assert c.max_tokens == 10
    assert c.lr == 3e-5 and c.bf16 is False  # CLI overrides JSON overrides defaults; launcher arg accepted
    m = M.Ovis25.from_pretrained(base)
    with pytest.raises(ValueError, match="train_modules: unknown module 'vision'; choose from all, llm"):
        sft.trainable(sft.Config(train_modules="llm|vision"), m.config)
    with pytest.raises(ValueError, match="train_modules is empty"):
        sft.trainable(sft.Config(train_modules=" | "), m.config)
    with pytest.raises(ValueError, match="schedule"):
        sft.lr_lambda(sft.Config(schedule="cosin"), 10)


def test_lr_schedule_and_param_groups(base):
    f = sft.lr_lambda(sft.Config(schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1), 100)
    assert f(0) < f(5) < f(9) <= 1.0 and abs(f(10) - 1.0) < 1e-9 and abs(f(100) - 0.1) < 1e-9
    m = M.Ovis25.from_pretrained(base)
    cfg = sft.Config(train_modules="llm:1e-4|visual_tokenizer.head:5e-5", lr=1e-3, weight_decay=0.1)
    groups = common.param_groups(m, sft.trainable(cfg, m.config), cfg.weight_decay)
    lrs = {(g["lr"], g["weight_decay"]) for g in groups}
    assert lrs == {(1e-4, 0.1), (1e-4, 0.0), (5e-5, 0.1), (5e-5, 0.0)}
    assert not any(p.requires_grad for p in m.visual_tokenizer.vit.parameters()) and not m.vte.weight.requires_grad
    assert all(p.requires_grad for p in m.llm.parameters())
    # visual_tokenizer.vit.last_block (the official trainer's name): the ViT's last encoder layer, and only it
    common.param_groups(m, sft.trainable(sft.Config(train_modules="vte|visual_tokenizer.vit.last_block:1e-5"),
                                         m.config), 0.0)
    last = f"visual_tokenizer.vit.vision_model.encoder.layers.{m.config.vit.num_hidden_layers - 1}."
    on = {n for n, p in m.named_parameters() if p.requires_grad}
    assert on == {n for n, _ in m.named_parameters() if n.startswith(last) or n.startswith("vte.")} and len(on) == 17


def test_frozen_modules_bit_identical_and_export_reloads(base, small_data, tmp_path):
    out = tmp_path / "frozen"
    live = run_inprocess(cfg_for(base, small_data, out, train_modules="llm|visual_tokenizer.head:0"))
    before, after = load_file(f"{base}/model.safetensors"), load_file(f"{out}/final/model.safetensors")
    assert set(before) == set(after)  # official key set, lm_head omitted (tied)
    for k in before:
        if k.startswith(("visual_tokenizer.", "vte.")):  # frozen, or trained with lr 0
            assert torch.equal(before[k], after[k]), k
    k = "llm.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[k], after[k])
    check_export(out / "final", base, "float32")  # read without our loader: config, files, key set, dtypes
    reloaded = M.Ovis25.from_pretrained(str(out / "final")).eval()
    live.eval()
    tok = M.load_tokenizer(str(out / "final"))
    sample = json.loads(Path(small_data).read_text())[0]
    enc = data.encode_sample(sample, tok, str(DEMO), single_image_min_pixels=4096, single_image_max_pixels=20480,
                             crop_min_pixels=4096, crop_max_pixels=8192)
    with torch.no_grad():
        args = (enc["input_ids"][None], None, enc["pixel_values"], enc["grid_thws"])
        assert torch.equal(live(*args).logits, reloaded(*args).logits)
    rec = metrics(out)
    assert rec[-1]["loss"] < rec[0]["loss"] and all(r["real_token_frac"] > 0.97 for r in rec)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "real_token_frac", "mem_gb"} <= set(rec[0])


def test_zero3_frozen_llm_and_random_init_match_zero2(small_data, tmp_path):
    """ZeRO-3 with frozen weights used outside their module (vte) or across checkpointed loss chunks (lm_head), and
    init_random under zero.Init: the same losses as ZeRO-2 (both were broken once: a crash, and a 5x loss)."""
    c = dict(model_path=str(ROOT / "assets" / "tiny"), init_random=True, train_modules="visual_tokenizer.head",
             max_steps=3, max_tokens=500, gradient_checkpointing=True)
    for z in (2, 3):
        run_inprocess(cfg_for(None, small_data, tmp_path / f"z{z}", **c,
                              zero_config=str(ROOT / "zero_configs" / f"zero{z}.json")))
    a, b = metrics(tmp_path / "z2"), metrics(tmp_path / "z3")
    assert len(a) == len(b) == 3 and a[0]["loss"] < 12.5
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)


def test_eval_early_stopping_keeps_best(base, small_data, tmp_path, capsys):
    out = tmp_path / "es"
    # lr so large that eval gets worse after the first steps: early stopping must trigger and keep the best
    run_inprocess(cfg_for(base, small_data, out, eval_data_path=small_data, eval_interval=1, lr=0.5,
                          schedule="constant", early_stopping_patience=2, epochs=3, max_tokens=400))
    rec = metrics(out)
    evals = [r["eval_loss"] for r in rec if "eval_loss" in r]
    stdout = capsys.readouterr().out
    assert "early stopping at step" in stdout and len(evals) == len(rec) >= 3  # eval_interval=1: one per step
    assert rec[-1]["epoch"] < 2  # stopped well before the 3 epochs
    best = min(evals)
    assert evals[-1] > best and evals[-2] > best  # stopped after `patience` evals without improvement
    check_export(out / "best", base, "float32")
    check_export(out / "final", base, "float32")


def test_resume_never_replaces_best_with_a_worse_model(base, small_data, tmp_path, capsys):
    """best.json records best/'s eval loss. A run resumed from a checkpoint older than the last best export (crash
    after exporting best/, before the next save) compares against best.json, not its checkpoint's stale record."""
    out = tmp_path / "b"
    c = cfg_for(base, small_data, out, eval_data_path=small_data, eval_interval=1, save_interval=1, keep_last=5,
                max_steps=2, max_tokens=400)
    run_inprocess(c)
    evals = [r["eval_loss"] for r in metrics(out)]
    assert evals[1] < evals[0]  # learning: step 2 exported best/
    assert json.loads((out / "best.json").read_text()) == {"value": evals[1], "step": 2}
    # a best/ (from a pretend later export) better than anything the resumed steps reach; resume from step 1
    (out / "best.json").write_text(json.dumps({"value": evals[1] - 1.0, "step": 3}))
    (out / "checkpoints" / "latest").write_text("step0000001")
    before = (out / "best" / "model.safetensors").read_bytes()
    run_inprocess({**c, "resume": "auto"})
    assert metrics(out)[1]["eval_loss"] < evals[0]  # step 2 beat the checkpoint's best_eval again ...
    assert (out / "best" / "model.safetensors").read_bytes() == before  # ... and still did not replace best/
    assert json.loads((out / "best.json").read_text())["value"] == evals[1] - 1.0


def test_two_ranks_zero2_equal_one_rank_grad_accum(base, small_data, tmp_path):
    """2 ranks x GA 1 (torchrun) == 1 rank x GA 2: the same rows per step, loss normalised by the global target
    token count; losses per step and final weights agree."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_inprocess(cfg_for(base, small_data, one, gradient_accumulation_steps=2, max_tokens=400))
    launch("torchrun", cfg_for(base, small_data, two, gradient_accumulation_steps=1, max_tokens=400), tmp_path)
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) >= 3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1, abs(x["loss"])), (x, y)
    wa, wb = load_file(f"{one}/final/model.safetensors"), load_file(f"{two}/final/model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_two_ranks_zero3_launcher_resume_halfway(base, small_data, tmp_path):
    """deepspeed launcher, ZeRO-3 (partitioned load from rank 0, gathered export): an interrupted run resumed from
    its halfway checkpoint reproduces the uninterrupted run's losses and weights."""
    out = tmp_path / "z3"
    c = cfg_for(base, small_data, out, zero_config=str(ROOT / "zero_configs" / "zero3.json"), max_tokens=300,
                epochs=2, save_interval=2, keep_last=10)
    launch("deepspeed", c, tmp_path)
    full = metrics(out)
    n = len(full)
    assert n >= 4
    w_full = load_file(f"{out}/final/model.safetensors")
    # simulate a crash after the halfway checkpoint: keep only step <= half, point `latest` at it
    ck = out / "checkpoints"
    half = sorted(d for d in os.listdir(ck) if d.startswith("step"))[(n // 2 - 1) // 2]
    for d in os.listdir(ck):
        if d.startswith("step") and d > half:
            subprocess.run(["rm", "-rf", str(ck / d)], check=True)
    (ck / "latest").write_text(half)
    step_half = int(half[4:])
    stdout = launch("deepspeed", {**c, "resume": "auto"}, tmp_path)
    assert f"resumed from {ck}/{half} at step {step_half}" in stdout
    resumed = metrics(out)
    assert len(resumed) == n
    for x, y in zip(full, resumed):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-6 * max(1, abs(x["loss"])), (x, y)
    w = load_file(f"{out}/final/model.safetensors")
    assert set(w) == set(w_full) == set(load_file(f"{base}/model.safetensors"))
    for k in w:
        assert torch.allclose(w[k], w_full[k], atol=1e-6), k


def test_overfit_one_tool_sample_greedy_reproduces_it(base, tmp_path):
    """Train on one Crop sample until greedy decoding with the real tool (a crop of the image inserted after
    </tool_call>, exactly as the training rendering) reproduces the training encoding token for token."""
    sample = json.loads((DEMO / "sft.json").read_text())[0]
    (tmp_path / "one.json").write_text(json.dumps([sample]))
    out = tmp_path / "overfit"
    m = run_inprocess(cfg_for(base, str(tmp_path / "one.json"), out, zero_config=str(ROOT / "zero_configs" /
                                                                                           "zero0.json"),
                              lr=1e-2, schedule="constant", max_steps=120, max_tokens=2048, save_interval=1000))
    m.eval()
    tok = M.load_tokenizer(base)
    pix = dict(single_image_min_pixels=4096, single_image_max_pixels=20480, crop_min_pixels=4096,
               crop_max_pixels=8192)
    target = data.encode_sample(sample, tok, str(DEMO), **pix)
    msgs = data.prompt_messages(sample, str(DEMO))
    inp = M.build_inputs(msgs, tok, enable_thinking=True, min_pixels=4096, max_pixels=20480)
    ids = inp["input_ids"]
    gen, st = m.generate(ids, inp["pixel_values"], inp["grid_thws"], max_new_tokens=200,
                         stop_token_ids=[tok.convert_tokens_to_ids("</tool_call>")], return_state=True)
    text = tok.decode(gen[0])
    assert text.rstrip().endswith("</tool_call>") and "Crop [" in text
    image = Image.open(DEMO / sample["image"])
    res = tools.load_tools(bbox_format="pixel").execute(text, [image], [sample["image"]])
    assert not res.error and res.image is not None
    add = tools.tool_result_ids(res, tok)
    pv, g = tools.tool_result_pixels(res, 4096, 8192)
    add = M.expand_placeholders(add, g)
    gen2 = m.generate(torch.tensor([add]), pv, g, max_new_tokens=200, state=st)
    full = ids[0].tolist() + gen[0].tolist() + add + gen2[0].tolist()
    assert full[-1] == M.IM_END_ID
    assert full == target["input_ids"].tolist()  # training drops the final "\n" after <|im_end|> as well
    # the crop inserted at inference is pixel-for-pixel the crop the training encoding holds
    n_orig = int(inp["pixel_values"].shape[0])
    assert torch.equal(target["pixel_values"][n_orig:], pv)


def test_shipped_configs_parse():
    for f in sorted((ROOT / "configs").glob("*sft*.json")):
        c = common.load_config(sft.Config, ["--config", str(f)])
        assert (ROOT / c.zero_config).exists() and M.parse_modules(c.train_modules, c.lr) != [], f
    for f in sorted((ROOT / "zero_configs").glob("*.json")):
        assert '"auto"' not in f.read_text(), f  # concrete values only; the script owns optimizer and schedule
        assert not {"optimizer", "scheduler", "train_batch_size"} & set(json.loads(f.read_text())), f


def test_every_stage_takes_the_same_zero_config_options(base, small_data, tmp_path, monkeypatch):
    """One plumbing (common.py) in sft / lora / grpo: a ZeRO-3 offload config that opts out of DeepSpeed's CPU Adam
    (`zero_force_ds_cpu_optimizer: false`, never compiled by this suite) runs in all three, each stage's optimizer
    built by common.optimizer (watched: the real function, its results kept) as torch's AdamW."""
    import grpo
    import lora


    z = json.loads((ROOT / "zero_configs" / "zero3_offload.json").read_text())
    (tmp_path / "off.json").write_text(json.dumps({**z, "zero_force_ds_cpu_optimizer": False}))
    zc = str(tmp_path / "off.json")
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    opt = common.optimizer([{"params": p}], {**z, "zero_force_ds_cpu_optimizer": False}, 1e-3, (0.9, 0.99))
    assert type(opt) is torch.optim.AdamW
    made, real = [], common.optimizer
    monkeypatch.setattr(common, "optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    for mod, extra in ((sft, {}), (lora, {"lora_r": 4})):
        c = cfg_for(base, small_data, tmp_path / mod.__name__, max_steps=1, zero_config=zc, **extra)
        mod.main(mod.Config(**{k: v for k, v in c.items() if k in mod.Config.__dataclass_fields__}))
        assert metrics(tmp_path / mod.__name__)[0]["grad_norm"] > 0
    g = {"model_path": base, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO), "zero_config": zc,
         "output_dir": str(tmp_path / "grpo"), "prompts_per_rank": 1, "num_generations": 4, "micro_batch_size": 4,
         "max_new_tokens": 8, "single_image_min_pixels": 4096, "single_image_max_pixels": 8192, "bf16": False,
         "gradient_checkpointing": False, "enable_thinking": False, "rewards": "tests.grpo_rewards.even_ids:1",
         "max_steps": 1, "lr": 1e-2}
    grpo.main(grpo.Config(**g))
    assert metrics(tmp_path / "grpo")[0]["grad_norm"] > 0
    assert [type(o) for o in made] == [torch.optim.AdamW] * 3  # sft, lora, grpo: the opt-out honoured by each


def test_an_exports_training_record_reaches_infer_and_grpo(base, small_data, tmp_path, capsys):
    """An sft.py export records the budgets and tools it trained with (ovis_tune.json beside config.json); infer.py
    and grpo.py take them as defaults for what they are not told, and say so in their `model:` / `grpo:` line."""
    import grpo
    import infer

    out = tmp_path / "rec"
    run_inprocess(cfg_for(base, small_data, out, max_steps=1, tools="Crop"))
    rec = json.loads((out / "final" / common.RECORD_FILE).read_text())
    assert rec["trained_by"] == "sft.py" and rec["tools"] == "Crop" and rec["single_image_max_pixels"] == 20480
    assert rec["crop_min_pixels"] == 4096 and "enable_thinking" not in rec  # sft.py has no such setting
    img = str(DEMO / "images" / "syn_000.png")
    args = ["--model", str(out / "final"), "--image", img, "--prompt", "What color?", "--greedy", "--max-new-tokens",
            "1", "--tools"]
    capsys.readouterr()
    assert infer.main(args) == 0
    said = capsys.readouterr().err
    assert "tools Crop |" in said and "from its training record (ovis_tune.json, sft.py):" in said
    assert "single_image_max_pixels 20480" in said and "crop_max_pixels 8192" in said
    session = infer.load(str(out / "final"), device="cpu")
    (r,) = infer.chat_batch(session, [{"image": img, "prompt": "What color?"}], max_new_tokens=1, do_sample=False)
    want = M.build_inputs([{"role": "user", "content": [{"type": "image", "image": img},
                                                        {"type": "text", "text": "What color?"}]}],
                          session.tokenizer, min_pixels=4096, max_pixels=20480)["input_ids"][0].tolist()
    assert r.token_ids[:r.prompt_len] == want  # the recorded budget, not data.Budgets' 448^2..1792^2
    assert infer.main(args + ["--single-image-max-pixels", "8192"]) == 0  # a flag wins over the record
    assert "single_image_max_pixels" not in capsys.readouterr().err.split("training record")[-1]
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"model_path": str(out / "final"), "data_path": str(DEMO / "grpo.json"),
                             "image_dir": str(DEMO), "output_dir": str(tmp_path / "grpo"), "prompts_per_rank": 1,
                             "num_generations": 2, "micro_batch_size": 2, "max_new_tokens": 4, "max_steps": 1,
                             "bf16": False, "gradient_checkpointing": False, "zero_config": str(ROOT / "zero_configs"
                                                                                                / "zero0.json"),
                             "rewards": "tests.grpo_rewards.even_ids:1", "crop_max_pixels": 16384}))
    cfg = common.load_config(grpo.Config, ["--config", str(g)])
    grpo.main(cfg)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("grpo:"))
    assert "from its training record: single_image_min_pixels 4096, single_image_max_pixels 20480" in line
    assert "crop_max_pixels" not in line.split("training record")[1] and cfg.crop_max_pixels == 16384  # told
    assert cfg.tools == "Crop" and cfg.single_image_max_pixels == 20480
