"""Runs that go wrong say so and stop: a non-zero exit, a message naming the step / file / field, and never a final/
of garbage. Divergence, no usable data, samples failing at load, dead samples, config typos, one bad inference
request. Real engines on the tiny model, CPU."""

import json
import re
import shutil

import pytest

import common
import data
import grpo
import infer
import lora
import sft
from _util import DEMO, ROOT, cfg_for, metrics, run_script

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def world_one():
    common.setup_distributed(120)
    yield


def test_divergence_stops_the_cli_without_final(base, small_data, tmp_path):
    """The reported probe (lr 1e6, constant): the loss turns NaN; exit 1 naming the step and the last good
    checkpoint; no final/; metrics.jsonl stays strict JSON (null + nonfinite); the diverged step is never saved."""
    out = tmp_path / "div"
    r = run_script("sft.py", cfg_for(base, small_data, out, lr=1e6, warmup_ratio=0.0, schedule="constant",
                                     max_steps=5, save_interval=1), tmp_path)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"sft\.py: error: step (\d+): loss nan, gradient norm \S+: the run diverged\. Stopped without "
                  r"writing final/\. Last good checkpoint: (\S+) \(fix the cause, then resume\)", r.stderr)
    assert m, r.stderr[-2000:]
    step = int(m.group(1))
    assert m.group(2) == str(out / "checkpoints" / f"step{step - 1:07d}") and step >= 2
    assert not (out / "final").exists() and "done" not in r.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))[-1] == \
        f"step{step - 1:07d}"  # the diverged weights were never saved
    rec = metrics(out)  # strict JSON
    assert rec[-1]["step"] == step and rec[-1]["loss"] is None and "loss" in rec[-1]["nonfinite"]
    assert all(x["loss"] is not None for x in rec[:-1])


def test_divergence_bf16_sft_lora_and_grpo(base, small_data, tmp_path):
    """bf16 (no loss scaling): the same stop. LoRA needs a larger push to blow up (lr 1e6 only saturates it)."""
    for mod, lr in ((sft, 1e6), (lora, 1e20)):
        c = cfg_for(base, small_data, tmp_path / mod.__name__, lr=lr, warmup_ratio=0.0, schedule="constant",
                    max_steps=6, bf16=True, lora_r=4, save_interval=100)
        c = {k: v for k, v in c.items() if k in mod.Config.__dataclass_fields__}
        with pytest.raises(common.RunError, match=r"step 2: loss nan.*Last good checkpoint: none saved yet \(fix"):
            mod.main(mod.Config(**c))
        assert not (tmp_path / mod.__name__ / "final").exists()
    g = {"model_path": base, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO),
         "output_dir": str(tmp_path / "grpo"), "zero_config": str(ROOT / "zero_configs" / "zero2.json"),
         "prompts_per_rank": 1, "num_generations": 4, "micro_batch_size": 4, "max_new_tokens": 8, "min_pixels": 4096,
         "max_pixels": 8192, "bf16": False, "gradient_checkpointing": False, "lr": 1e20, "enable_thinking": False,
         "rewards": "tests.grpo_rewards.even_ids:1", "max_steps": 6, "save_interval": 1}
    # GRPO: the update of step 1 leaves non-finite weights; the rollout of step 2 finds out and stops
    with pytest.raises(common.RunError, match=r"step 2: generate: the model's next-token logits are not finite "
                                            r"\(diverged weights\?\): the run diverged\. Stopped without writing "
                                            r"final/\. Last good checkpoint: .*step0000001 \(fix"):
        grpo.main(grpo.Config(**g))
    assert not (tmp_path / "grpo" / "final").exists() and len(metrics(tmp_path / "grpo")) == 1


def test_nothing_to_train_on_fails_before_any_model(base, small_data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "conversations": [')
    for kw, msg in (
        (dict(data_path=str(bad)), rf"data_path: no usable sample in {bad} \(skipped {{'json': 1}}"),
        (dict(max_length=10, max_steps=3), r"data_path: no usable sample .*'over-long': 10"),
        (dict(eval_data_path=str(bad)), r"eval_data_path: no usable sample"),
        (dict(epochs=0), r"0 training steps \(epochs=0, max_steps=0\)"),
    ):
        c = {**cfg_for(base, small_data, tmp_path / "out"), **kw}
        with pytest.raises(common.RunError, match=msg):
            sft.main(sft.Config(**c))
        with pytest.raises(common.RunError, match=msg):
            lora.main(lora.Config(**c))
        assert not (tmp_path / "out" / "final").exists()


def test_samples_failing_at_load_stop_the_run(base, tmp_path):
    """Truncated images pass the header-only length pass, then fail to decode: steps without any target token are
    counted, and the run stops instead of logging loss 0 to the end."""
    shutil.copy(FIXTURES / "data" / "corrupt.png", tmp_path / "c.png")
    samples = [{"id": f"s{i}", "image": "c.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"Answer {i}."}]}
        for i in range(6)]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    c = cfg_for(base, str(tmp_path / "d.json"), tmp_path / "out", image_dir=str(tmp_path), max_tokens=200,
                max_steps=5)
    with pytest.raises(common.RunError, match=r"step 2: 2 of 2 steps had no target token on any rank \(\d+ samples "
                                            r"failed to load; run python data\.py check\)"):
        sft.main(sft.Config(**c))
    assert not (tmp_path / "out" / "final").exists()
    rec = metrics(tmp_path / "out")
    assert [x["targets"] for x in rec] == [0, 0] and all(x["load_failures"] > 0 for x in rec)


def test_dead_samples_are_dropped_and_counted(tokenizer):
    kw = dict(single_image_min_pixels=4096, single_image_max_pixels=20480, crop_min_pixels=4096,
              crop_max_pixels=8192)
    logs = []
    ds = data.SFTDataset(str(DEMO / "sft.json"), tokenizer, str(DEMO), log=logs.append, max_length=64,
                         overlong="truncate", **kw)
    n = len(json.loads((DEMO / "sft.json").read_text()))
    assert ds.skipped["no learned token"] > 0 and len(ds) + ds.skipped["no learned token"] == n
    assert "'no learned token'" in logs[-1]
    for i in range(len(ds)):  # every kept sample still teaches something
        assert (ds[i]["labels"] != data.IGNORE_ID).any()
    human, gpt = {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}
    with pytest.raises(data.SampleError, match=r"field=conversations\[0\]: a gpt turn before any human turn"):
        data.encode_sample({"id": "a", "conversations": [gpt, human, gpt]}, tokenizer)
    with pytest.raises(data.SampleError, match=r"field=conversations\[1\]\.value: empty gpt answer") as e:
        data.encode_sample({"id": "b", "conversations": [human, {"from": "gpt", "value": " \n"}]}, tokenizer)
    assert e.value.reason == "empty answer"


def test_enumerated_settings_are_validated():
    with pytest.raises(ValueError, match=r"config key 'overlong': 'truncat' is not one of \['drop', 'truncate'\]"):
        common.load_config(sft.Config, ["--overlong=truncat"])
    with pytest.raises(ValueError, match="config key 'overlong'"):
        lora.Config(overlong="truncat")
    with pytest.raises(ValueError, match="config key 'schedule': 'cosin'"):
        sft.Config(schedule="cosin")
    with pytest.raises(ValueError, match="config key 'bbox_format': 'normalized'"):
        common.load_config(grpo.Config, ["--bbox_format", "normalized"])
    with pytest.raises(ValueError, match="config key 'loss_type': 'ppo'"):
        grpo.Config(loss_type="ppo")
    assert common.load_config(sft.Config, ["--overlong=truncate"]).overlong == "truncate"


def test_run_guard_rules(tmp_path):
    ok = {"loss": 1.0, "grad_norm": 2.0, "targets": 10}
    g = common.RunGuard(max_skips=2, max_empty_frac=0.5, loss_scaled=True, output_dir=str(tmp_path))
    # fp16: an overflow (inf gradient norm, the step skipped) is allowed max_skips times in a row
    assert g.check(1, {**ok, "grad_norm": float("inf")}, 1) == "" and g.check(2, ok, 1) == ""  # reset by a good step
    assert g.check(3, {**ok, "grad_norm": float("inf")}, 2) == "" == g.check(4, ok, 3)
    assert "3 steps in a row skipped for fp16 overflow (max_skipped_steps 2)" in g.check(5, ok, 4)
    g = common.RunGuard(max_skips=2, max_empty_frac=0.5, loss_scaled=False, output_dir=str(tmp_path))
    assert g.check(1, {**ok, "grad_norm": float("inf")}, 0).startswith("step 1: loss 1.0, gradient norm inf: the run")
    g.last_good = "ck/step1"
    (tmp_path / "best").mkdir()
    assert g.check(2, {**ok, "loss": float("nan")}, 0).endswith(
        f"Last good checkpoint: ck/step1; best model so far: {tmp_path}/best (fix the cause, then resume)")
    g = common.RunGuard(max_skips=2, max_empty_frac=0.5, loss_scaled=False, output_dir=str(tmp_path))
    assert [g.check(s, {**ok, "targets": t}, 0) == "" for s, t in ((1, 0), (2, 5), (3, 5), (4, 0))] == [True] * 4
    assert "3 of 5 steps had no target token" in g.check(5, {**ok, "targets": 0}, 0)
    assert common.metrics_line({"step": 1, "loss": float("nan"), "x": float("-inf"), "y": 2.0}) == \
        '{"step": 1, "loss": null, "x": null, "y": 2.0, "nonfinite": ["loss", "x"]}\n'


def test_infer_batch_answers_around_bad_requests(base, tmp_path, capsys):
    img = str(DEMO / "images" / "syn_000.png")
    lines = [json.dumps({"id": "ok1", "image": img, "prompt": "What is it?"}),
             json.dumps({"id": "missing", "image": str(tmp_path / "later.png"), "prompt": "And this?"}),
             '{"id": "torn", "prompt": ',
             json.dumps({"id": "bad_messages", "messages": "hello"}),
             json.dumps({"prompt": "Say hi."})]  # no id: its line number, 4 (not its place among good lines)
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("\n".join(lines) + "\n")
    args = ["--model", base, "--input", str(q), "--output", str(out), "--greedy", "--max-new-tokens", "4",
            "--min-pixels", "4096", "--max-pixels", "8192", "--device", "cpu"]
    assert infer.main(args) == 1  # finished, but says something went wrong
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "answer" in recs["ok1"] and "answer" in recs[4] and recs["ok1"]["n_generated"] == 4
    assert re.fullmatch(rf"{q}:1 id=missing field=image: missing image {tmp_path}/later\.png \(FileNotFoundError\)",
                        recs["missing"]["error"])
    assert "field=messages: must be a list" in recs["bad_messages"]["error"]
    assert recs[f"{q}:2"]["error"].startswith(f"{q}:2 id=None field=json: invalid JSON")
    assert "2 answered, 3 errors, 0 already in" in capsys.readouterr().out
    shutil.copy(img, tmp_path / "later.png")  # fix one cause, ask the errors again: only those run
    assert infer.main(args + ["--retry-errors"]) == 1
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs if "error" not in r] == ["ok1", 4, "missing"]
    assert sorted(r["id"] for r in recs if "error" in r) == sorted([f"{q}:2", "bad_messages"])
    assert "1 answered, 2 errors, 2 already in" in capsys.readouterr().out
    assert infer.main(args) == 1 and "0 answered, 0 errors, 4 already in" in capsys.readouterr().out  # 2 left
