"""Exports checked by readers that are not ours: the source's config.json key by key, byte copies of the other files,
the official key set and dtypes read with safetensors, the RoPE base as transformers 4.x reads it, and stock
transformers 4.51.3 (the version the released config.json names) computing our logits and greedy tokens from an
export. Hub ids resolved offline through the real huggingface_hub code. Nothing here trusts model.py's loader."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config

import merge_lora
import model as M
import sft
from _util import ROOT, cfg_for, check_export, config_changes, hub_cache, official_keys, rope_base_as_4x_reads_it

GOLD = ROOT / "tests" / "fixtures" / "golden_a" / "model"
CFG_9B = ROOT / "configs" / "ovis25_9b_config.json"
TF4 = Path(os.environ.get("OVIS_TF4_DIR", ROOT / ".venv" / "readers" / "tf451"))  # tests/readers_tf451.txt


pytestmark = pytest.mark.usefixtures("world_one")  # one process group for in-process engines (conftest)


def test_golden_export_is_the_official_checkpoint(tmp_path):
    """Load the official golden checkpoint, save it in its own dtype: the same config.json, the same files, the same
    tensors bit for bit. In fp32 only torch_dtype changes."""
    m = M.Ovis25.from_pretrained(str(GOLD))
    m.save_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    src = json.loads((GOLD / "config.json").read_text())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()) == src  # key by key, value by value
    check_export(tmp_path / "bf16", GOLD, "bfloat16")
    want, got = load_file(str(GOLD / "model.safetensors")), load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    m.save_pretrained(str(tmp_path / "fp32"))
    assert config_changes(json.loads((tmp_path / "fp32" / "config.json").read_text()), src) == {"torch_dtype"}
    check_export(tmp_path / "fp32", GOLD, "float32")


def test_real_9b_config_is_written_back_as_read():
    src = json.loads(CFG_9B.read_text())
    cfg = M.OvisConfig.from_dict(src)
    assert cfg.to_dict(dtype=torch.bfloat16) == src  # what save_pretrained writes as config.json
    fp32 = cfg.to_dict(dtype=torch.float32)
    assert config_changes(fp32, src) == {"torch_dtype"} and fp32["llm_config"] == src["llm_config"]
    assert rope_base_as_4x_reads_it(fp32["llm_config"]) == 1_000_000
    with torch.device("meta"):
        names = set(M.Ovis25(cfg, "sdpa").state_dict())
    assert names == official_keys(src) and len(names) == 840  # spec 3: 840 tensors, lm_head untied


def test_config_spellings_that_readers_disagree_on(tmp_path):
    """(1) A config in transformers 5.x's spelling only (what this project's exports used to hold: rope_parameters,
    no rope_theta): loading warns, the export writes rope_theta. (2) A config built in code: written in the
    released spelling, read back to the same model."""
    src = json.loads((GOLD / "config.json").read_text())
    old = json.loads(json.dumps(src))
    old["llm_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": old["llm_config"].pop("rope_theta")}
    with pytest.warns(UserWarning, match="no rope_theta .* run RoPE with base 10000 instead of 1e"):
        cfg = M.OvisConfig.from_dict(old)
    fixed = cfg.to_dict(dtype=torch.bfloat16)
    assert config_changes(fixed, old) == {"llm_config.rope_theta"} and rope_base_as_4x_reads_it(
        fixed["llm_config"]) == 1_000_000
    assert rope_base_as_4x_reads_it(old["llm_config"]) == 10_000  # the bug the check catches

    llm = Qwen3Config(vocab_size=151936, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=8, rope_theta=500_000.0,
                      tie_word_embeddings=False)
    vit = M.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                      window_size=64, fullatt_block_indexes=[0])
    built = M.OvisConfig(vit=vit, llm=llm, hidden_size=48, visual_vocab_size=128)
    d = built.to_dict(dtype=torch.float32)
    assert set(d["llm_config"]) == set(M.LLM_CONFIG_KEYS) and "rope_parameters" not in d["llm_config"]
    assert d["llm_config"]["rope_theta"] == 500_000 and rope_base_as_4x_reads_it(d["llm_config"]) == 500_000
    assert d["vit_config"]["fullatt_block_indexes"] == "0" and d["model_type"] == "ovis2_5"
    back = M.OvisConfig.from_dict(d)
    assert back.vit == vit and M.rope_theta(back.llm) == 500_000 and back.llm.head_dim == 8
    assert back.to_dict(dtype=torch.float32) == d
    with torch.device("meta"):
        assert set(M.Ovis25(built, "sdpa").state_dict()) == official_keys(d)


# ---------------------------------------------------------------------------------------------------------------
# transformers 4.51.3 reads our exports


def _ours(ckpt: str, tokenizer, out: Path) -> dict:
    """Our model's input embeddings, logits and greedy tokens on an image prompt, for the 4.51 reader."""
    m = M.Ovis25.from_pretrained(ckpt).eval()
    probe = merge_lora.probe_inputs(tokenizer, "cpu", m.config.geometry)
    with torch.no_grad():
        t = {"embeds": m.embed(probe["input_ids"], probe["pixel_values"], probe["grid_thws"]),
             "logits": m(**probe).logits, "greedy": m.generate(**probe, max_new_tokens=8)}
    torch.save(t, out)
    return {"dir": ckpt, "inputs": str(out)}


def _until_eos(ids: list) -> list:
    return ids[:next((i + 1 for i, t in enumerate(ids) if t in M.EOS_IDS), len(ids))]


def test_transformers_451_reads_our_exports(base, small_data, tokenizer, tmp_path):
    """Stock transformers 4.51.3 builds the LLM from each export's config.json and weights and computes our logits
    (<= 1e-4) and greedy tokens from our input embeddings; a config without rope_theta (the old bug) is caught."""
    if not (TF4 / "transformers").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{TF4}: transformers 4.51.3 missing (.ci/run installs tests/readers_tf451.txt there)")
        pytest.skip(f"transformers 4.51.3 not installed in {TF4} (pip install --no-deps --target {TF4} -r "
                    "tests/readers_tf451.txt)")
    exports = {"golden": tmp_path / "golden"}
    M.Ovis25.from_pretrained(str(GOLD)).save_pretrained(str(exports["golden"]), dtype=torch.bfloat16)
    exports["base"] = Path(base)  # the tiny random model every training test starts from (fp32)
    # a real sft.py export: ZeRO-3, bf16, weights gathered from the partitions
    sft.main(sft.Config(**cfg_for(base, small_data, tmp_path / "sft", max_steps=2, max_tokens=500, bf16=True,
                                  zero_config=str(ROOT / "zero_configs" / "zero3.json"))))
    exports["sft_z3_bf16"] = tmp_path / "sft" / "final"
    check_export(exports["sft_z3_bf16"], base, "bfloat16")
    # the old bug, as a control: the RoPE base spelled only in 5.x's way
    bad = tmp_path / "no_rope_theta"
    shutil.copytree(exports["golden"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["llm_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["llm_config"].pop("rope_theta")}
    (bad / "config.json").write_text(json.dumps(cfg))
    cases = [_ours(str(d), tokenizer, tmp_path / f"{k}.pt") for k, d in exports.items()]
    with pytest.warns(UserWarning, match="no rope_theta"):
        cases.append(_ours(str(bad), tokenizer, tmp_path / "bad.pt"))
    (tmp_path / "9b").mkdir()
    (tmp_path / "9b" / "config.json").write_text(json.dumps(M.OvisConfig.from_dict(json.loads(CFG_9B.read_text()))
                                                            .to_dict(dtype=torch.bfloat16)))
    cases.append({"dir": str(tmp_path / "9b")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(TF4)}  # 4.51.3 shadows the project's transformers 5.x
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "tf4_reader.py"), str(tmp_path / "cases.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert {x["transformers"] for x in res} == {"4.51.3"}
    *good, control, nine = res
    for x in good:
        assert x["rope_theta"] == 1_000_000 and x["unexpected"] == [], x
        assert set(x["missing"]) <= {"lm_head.weight"}, x  # tied: lm_head is embed_tokens
        assert x["max_diff"] <= 1e-4 and x["argmax_agree"] == 1.0, x
        assert _until_eos(x["greedy"]) == _until_eos(x["ours_greedy"]), x
    assert control["rope_theta"] == 10_000 and control["max_diff"] > 1e-2, control  # the check can fail
    assert nine["rope_theta"] == 1_000_000


# ---------------------------------------------------------------------------------------------------------------
# Hub ids, offline, through the real huggingface_hub code


def test_hub_ids_resolve_offline(base, tmp_path):
    snaps = hub_cache(tmp_path / "hf", base)
    script = textwrap.dedent("""
        import json, sys
        import hub, infer
        out = {k: hub.resolve_checkpoint(k) for k in sys.argv[1:4]}
        eng = infer.load("tiny-org/ovis-tiny", device="cpu")
        out["loaded"] = [eng.model.source_dir, eng.model.config.hidden_size, len(eng.tokenizer)]
        for bad in ("tiny-org/unknown@v3", "no/such/dir"):
            try:
                hub.resolve_checkpoint(bad)
            except FileNotFoundError as e:
                out[bad] = [str(e), type(e.__cause__).__name__]
        print(json.dumps(out))
    """)
    ids = ["tiny-org/ovis-tiny", "tiny-org/ovis-tiny@v1", f"tiny-org/ovis-tiny@{snaps['sha_v1']}"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script, *ids], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [out[k] for k in ids] == [snaps["main"], snaps["v1"], snaps["v1"]]
    assert out["loaded"] == [os.path.abspath(snaps["main"]), 64, 151669]
    assert out["tiny-org/unknown@v3"] == [
        "model 'tiny-org/unknown@v3' is not a local directory, and it is not in the Hugging Face cache and the Hub "
        "cannot be reached (HF_HUB_OFFLINE=1). Download it where there is network (`hf download tiny-org/unknown "
        "--revision v3` fills the same cache) or pass a local checkpoint directory instead.",
        "LocalEntryNotFoundError"]
    assert out["no/such/dir"] == ["no/such/dir: no such checkpoint directory (a Hub id reads org/name or "
                                  "org/name@revision)", "NoneType"]
