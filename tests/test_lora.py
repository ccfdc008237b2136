"""lora.py and merge_lora.py on real DeepSpeed engines (CPU, gloo) and real peft adapters. All fp32."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import common
import data
import infer
import lora
import merge_lora
import model as M
from _util import DEMO, ROOT, cfg_for, check_adapter, check_export, hub_cache, launch, metrics
from hub import load_adapter  # (`hub` is also this module's Hugging Face cache fixture)

MTS = "visual_tokenizer.head|vte:5e-3"  # modules trained in full beside the adapters in these runs


pytestmark = pytest.mark.usefixtures("world_one")  # one process group for in-process engines (conftest)


def lcfg(base, data_path, out, **kw):
    return cfg_for(base, data_path, out, **{"lr": 1e-2, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                            "modules_to_save": MTS, **kw})


def adapted(peft_model) -> set:
    return {n.split(".lora_A.")[0].removeprefix("base_model.model.") for n, _ in peft_model.named_parameters()
            if ".lora_A." in n}


def sample_inputs(tok, i=1):
    """A training sample of the demo data (image + text), as model inputs: inputs of our own, not the probe."""
    s = json.loads((DEMO / "sft.json").read_text())[i]
    enc = data.encode_sample(s, tok, str(DEMO), single_image_min_pixels=4096, single_image_max_pixels=20480,
                             crop_min_pixels=4096, crop_max_pixels=8192)
    return {"input_ids": enc["input_ids"][None], "pixel_values": enc["pixel_values"], "grid_thws": enc["grid_thws"]}


@pytest.fixture(scope="module")
def hub(base, tmp_path_factory) -> dict:
    """An offline HF cache holding the tiny base as tiny-org/ovis-tiny (main and v1), and the env that finds it."""
    root = tmp_path_factory.mktemp("hf")
    return {"snapshots": hub_cache(root, base), "env": {"HF_HOME": str(root), "HF_HUB_OFFLINE": "1"}}


@pytest.fixture(scope="module")
def runs(base, small_data, hub, tmp_path_factory):
    """The same LoRA run on 2 ranks at ZeRO-2 and at ZeRO-3 (with activation checkpointing), through torchrun;
    tests/lora_ranks.py checks the live model against the base on every rank and saves its probe logits. The ZeRO-3
    run names its base by Hub id (resolved offline from the cache, rank 0 first)."""
    tmp = tmp_path_factory.mktemp("lora_runs")
    outs = {}
    for z in (2, 3):
        outs[z] = tmp / f"z{z}"
        path = "tiny-org/ovis-tiny@v1" if z == 3 else base
        launch("torchrun", lcfg(path, small_data, outs[z], zero_config=str(ROOT / "zero_configs" / f"zero{z}.json"),
                                max_tokens=400, gradient_checkpointing=z == 3), tmp, script="tests/lora_ranks.py",
               env=hub["env"] if z == 3 else None)
    return outs


def test_targets_only_the_llm_unless_lora_vit(base):
    m = M.Ovis25.from_pretrained(base)
    n_llm, n_vit = m.config.llm.num_hidden_layers, m.config.vit.num_hidden_layers
    pm = get_peft_model(m, lora.lora_config(lora.Config(lora_r=4), m.config))
    names = adapted(pm)
    assert len(names) == 7 * n_llm and all(n.startswith("llm.model.layers.") for n in names)
    # the ViT's q/k/v_proj share the LLM's short names: with lora_vit false none of its weights has an adapter
    assert not any("lora_" in n for n, _ in pm.named_parameters() if "visual_tokenizer" in n)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    vit = get_peft_model(M.Ovis25.from_pretrained(base), lora.lora_config(
        lora.Config(lora_r=4, lora_vit=True, lora_targets="q_proj,down_proj", lora_rslora=True, lora_alpha=8),
        m.config))
    names = adapted(vit)
    assert len([n for n in names if n.startswith("visual_tokenizer.vit.")]) == 6 * n_vit
    assert {re.sub(r"\d+", "N", n) for n in names if n.startswith("llm.")} == {
        "llm.model.layers.N.self_attn.q_proj", "llm.model.layers.N.mlp.down_proj"}
    lin = vit.base_model.model.llm.model.layers[0].self_attn.q_proj
    assert abs(lin.scaling["default"] - 8 / 4 ** 0.5) < 1e-9  # rslora: alpha / sqrt(r)
    with pytest.raises(ValueError, match="lora_targets"):
        lora.lora_config(lora.Config(lora_targets="q_proj,fc1"), m.config)
    with pytest.raises(ValueError, match="modules_to_save: unknown module 'llm'"):
        lora.lora_config(lora.Config(modules_to_save="llm"), m.config)
    with pytest.raises(ValueError, match="cannot also carry ViT adapters"):
        lora.lora_config(lora.Config(modules_to_save="visual_tokenizer.vit.last_block", lora_vit=True), m.config)
    cfg = lora.Config(lora_r=4, modules_to_save="visual_tokenizer.head:5e-5|vte|visual_tokenizer.vit.last_block:7e-5",
                      lr=1e-3, weight_decay=0.1)
    pm = get_peft_model(M.Ovis25.from_pretrained(base), lora.lora_config(cfg, m.config))
    groups = common.param_groups(pm, lora.trainable(cfg, pm), cfg.weight_decay)
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {(1e-3, 0.1), (5e-5, 0.1), (5e-5, 0.0), (7e-5, 0.1),
                                                              (7e-5, 0.0)}
    head = {id(p) for n, p in pm.named_parameters() if "head.modules_to_save" in n}
    assert head and all(g["lr"] == 5e-5 for g in groups for p in g["params"] if id(p) in head)
    # the official name of the ViT's last block: its last encoder layer, copied in full (and only that one)
    last = f"visual_tokenizer.vit.vision_model.encoder.layers.{n_vit - 1}.modules_to_save."
    copies = {n for n, p in pm.named_parameters() if ".modules_to_save." in n and p.requires_grad}
    assert {n for n in copies if "encoder.layers" in n} == {n for n in copies if last in n} != set()


def test_two_ranks_zero2_zero3_train_only_the_adapter(runs, base):
    n_llm = M.Ovis25.from_pretrained(base).config.llm.num_hidden_layers
    n_base = len(load_file(f"{base}/model.safetensors"))
    for z, out in runs.items():
        r = json.loads((out / "report.json").read_text())
        # every base tensor bit-identical after training, on every rank; adapters and chosen copies trained
        assert r["base_changed"] == [] and r["missing"] == [] and r["base_checked"] == n_base, (z, r)
        assert r["lora"] == 2 * 7 * n_llm and r["lora_B_nonzero"] == 7 * n_llm and r["vit_adapters"] == 0, r
        assert r["copies"] == 4 and r["copies_changed"] == 4, r
        acfg = json.loads((out / "final" / "adapter_config.json").read_text())
        recorded = (acfg["base_model_name_or_path"], acfg["revision"])
        assert recorded == (("tiny-org/ovis-tiny", "v1") if z == 3 else (os.path.abspath(base), None)), recorded
        assert acfg["r"] == 4
        check_adapter(out / "final", json.loads((Path(base) / "config.json").read_text()))
        sd = load_file(f"{out}/final/adapter_model.safetensors")
        assert len([k for k in sd if "lora_" in k]) == 2 * 7 * n_llm and not any(".vit." in k for k in sd)
        assert {k for k in sd if "lora_" not in k} == {f"base_model.model.{k}" for k in (
            "visual_tokenizer.head.0.weight", "visual_tokenizer.head.1.weight", "visual_tokenizer.head.1.bias",
            "vte.weight")}
        ckpt = out / "checkpoints"
        assert (ckpt / "latest").exists() and sum(f.stat().st_size for f in ckpt.rglob("*.pt")) < 60e6
    a, b = metrics(runs[2]), metrics(runs[3])
    assert len(a) == len(b) >= 3 and a[-1]["loss"] < a[0]["loss"]
    for x, y in zip(a, b):  # ZeRO-2 and ZeRO-3 (+ checkpointing) train the same adapter
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1, abs(x["loss"])), (x, y)
    wa, wb = (load_file(f"{runs[z]}/final/adapter_model.safetensors") for z in (2, 3))
    for k in wa:  # Adam magnifies fp32 reduction-order noise on the visual head's tiny gradients to ~2e-5
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k


def test_adapter_save_load_gives_identical_logits(runs, base, tokenizer):
    """Stock peft (PeftModel.from_pretrained, no checks of ours) loads each adapter onto the model with the official
    module tree: every saved tensor lands, and the logits are the live model's."""
    probe = merge_lora.probe_inputs(tokenizer, "cpu", M.read_config(base).geometry)
    for out in runs.values():
        live = torch.load(out / "live_logits.pt")
        pm = PeftModel.from_pretrained(M.Ovis25.from_pretrained(base).eval(), str(out / "final"))
        params = dict(pm.named_parameters())
        copies = json.loads((out / "final" / "adapter_config.json").read_text())["modules_to_save"]
        for k, t in load_file(f"{out}/final/adapter_model.safetensors").items():
            name = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            for mod in copies:  # ...visual_tokenizer.head.0.weight -> ...head.modules_to_save.default.0.weight
                name = name.replace(f"model.{mod}.", f"model.{mod}.modules_to_save.default.")
            assert torch.equal(params[name].detach(), t), k
        with torch.no_grad():
            got = pm(**probe).logits
            with pm.disable_adapter():
                plain = pm(**probe).logits
        assert torch.equal(got, live)
        assert (got - plain).abs().max() > 1e-3  # the adapter does change the model


def test_merge_equals_adapter_and_keeps_the_base_layout(runs, base, hub, tokenizer, tmp_path, capsys):
    adapter = str(runs[2] / "final")
    out = tmp_path / "merged"
    assert merge_lora.main(["--adapter", adapter, "--out", str(out), "--dtype", "fp32"]) == 0
    diff = float(re.search(r"logit difference (\S+)", capsys.readouterr().out).group(1))
    assert diff <= 1e-4
    check_export(out, base, "float32")  # the base's config.json, files and official key set
    merged = M.Ovis25.from_pretrained(str(out)).eval()  # a plain checkpoint for model.py
    pm = load_adapter(M.Ovis25.from_pretrained(base).eval(), adapter)
    eng = infer.load(None, adapter=adapter, device="cpu")  # infer merges at load, base read from the adapter
    with torch.no_grad():
        for i in (1, 5):
            inp = sample_inputs(tokenizer, i)
            want = pm(**inp).logits
            assert (merged(**inp).logits - want).abs().max() <= 1e-4
            assert (eng.model(**inp).logits - want).abs().max() <= 1e-4
    # never overwrites; bf16 output; clear failure on an adapter of another model
    with pytest.raises(SystemExit, match="exists"):
        merge_lora.main(["--adapter", adapter, "--out", str(out)])
    assert merge_lora.main(["--adapter", adapter, "--out", str(tmp_path / "bf16")]) == 0
    check_export(tmp_path / "bf16", base, "bfloat16")
    # the ZeRO-3 adapter records its base as a Hub id: merge_lora resolves it from the (offline) cache
    env = {**os.environ, **hub["env"], "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "merge_lora.py"), "--adapter", str(runs[3] / "final"), "--out",
                        str(tmp_path / "from_hub")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "logit difference" in r.stdout, r.stderr[-3000:]
    check_export(tmp_path / "from_hub", hub["snapshots"]["v1"], "bfloat16")
    cfg = json.loads((ROOT / "assets" / "tiny" / "config.json").read_text())
    cfg["llm_config"]["intermediate_size"] = 96
    other = M.Ovis25.from_config(cfg)
    other.save_pretrained(str(tmp_path / "other"), source_dir=str(ROOT / "assets" / "tiny"))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.lora_[AB]\.weight has shape .* another model"):
        merge_lora.main(["--base", str(tmp_path / "other"), "--adapter", adapter, "--out", str(tmp_path / "x"),
                         "--force"])
    with pytest.raises(SystemExit, match=r"--base .*other is not the base the adapter was trained on .*--force"):
        merge_lora.main(["--base", str(tmp_path / "other"), "--adapter", adapter, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="not a peft LoRA adapter"):
        merge_lora.main(["--base", base, "--adapter", str(tmp_path), "--out", str(tmp_path / "x")])


def test_resume_eval_and_best(base, small_data, tmp_path):
    """One rank, in process: an interrupted LoRA run resumed from its halfway checkpoint reproduces the
    uninterrupted run (losses and adapter); eval runs and best/ holds an adapter."""
    out = tmp_path / "r"
    c = lcfg(base, small_data, out, max_tokens=500, epochs=2, save_interval=2, keep_last=10,
             eval_data_path=small_data, eval_interval=2)
    lora.main(lora.Config(**c))
    full = metrics(out)
    w_full = load_file(f"{out}/final/adapter_model.safetensors")
    assert any("eval_loss" in r for r in full) and (out / "best" / "adapter_model.safetensors").exists()
    ck = out / "checkpoints"
    half = sorted(d for d in os.listdir(ck) if d.startswith("step"))[len(full) // 4 - 1]
    for d in os.listdir(ck):
        if d.startswith("step") and d > half:
            shutil.rmtree(ck / d)
    (ck / "latest").write_text(half)
    lora.main(lora.Config(**{**c, "resume": "auto"}))
    resumed = metrics(out)
    assert len(resumed) == len(full)
    for x, y in zip(full, resumed):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-6 * max(1, abs(x["loss"])), (x, y)
    w = load_file(f"{out}/final/adapter_model.safetensors")
    for k in w:
        assert torch.allclose(w[k], w_full[k], atol=1e-6), k


def test_shipped_lora_configs_parse():
    for f in sorted((ROOT / "configs").glob("*lora*.json")):
        c = common.load_config(lora.Config, ["--config", str(f)])
        assert (ROOT / c.zero_config).exists(), f
        assert lora.lora_config(c, M.OvisConfig.from_dict(M.json.load(open(ROOT / "assets/tiny/config.json")))).r \
            == c.lora_r, f
