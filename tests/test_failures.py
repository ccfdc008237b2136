"""Runs that go wrong say so and stop: a non-zero exit, a message naming the step / file / field, and never a final/
of garbage. Divergence, no usable data, samples failing at load, dead samples, config typos, one bad inference
request. Real engines on the tiny model, CPU."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import common
import data
import grpo
import infer
import lora
import model as M
import sft
import tools
from _util import DEMO, ROOT, cfg_for, metrics, run_script

FIXTURES = ROOT / "tests" / "fixtures"


pytestmark = pytest.mark.usefixtures("world_one")  # one process group for in-process engines (conftest)


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
         "prompts_per_rank": 1, "num_generations": 4, "micro_batch_size": 4, "max_new_tokens": 8,
         "single_image_min_pixels": 4096, "single_image_max_pixels": 8192, "bf16": False,
         "gradient_checkpointing": False, "lr": 1e20, "enable_thinking": False,
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
    g = common.RunGuard(2, 0.5, False, str(tmp_path), total_steps=1)  # a one-step run: its last step counts alone
    assert "1 of 1 steps had no target token" in g.check(1, {**ok, "targets": 0}, 0)
    g = common.RunGuard(2, 0.5, False, str(tmp_path), total_steps=4)  # (not before the last)
    assert g.check(1, {**ok, "targets": 0}, 0) == "" and g.check(2, ok, 0) == ""
    g = common.RunGuard(2, 1.0, False, str(tmp_path), max_dead=3)  # a streak goes on after a resume
    assert g.check(1, {**ok, "grad_norm": 0.0}, 0) == "" == g.check(2, {**ok, "grad_norm": 0.0}, 0)
    again = common.RunGuard(2, 1.0, False, str(tmp_path), max_dead=3)
    again.load_state_dict(g.state_dict(), 0)
    assert "gradient norm 0 on 3 steps in a row" in again.check(3, {**ok, "grad_norm": 0.0}, 0)
    assert common.metrics_line({"step": 1, "loss": float("nan"), "x": float("-inf"), "y": 2.0}) == \
        '{"step": 1, "loss": null, "x": null, "y": 2.0, "nonfinite": ["loss", "x"]}\n'


def test_infer_batch_answers_around_bad_requests(base, tmp_path, capsys):
    img = str(DEMO / "images" / "syn_000.png")
    lines = [json.dumps({"id": "ok1", "image": img, "prompt": "What is it?"}),
             json.dumps({"id": "missing", "image": str(tmp_path / "later.png"), "prompt": "And this?"}),
             '{"id": "torn", "prompt": ',
             json.dumps({"id": "bad_messages", "messages": "hello"}),
             json.dumps({"prompt": "Say hi."})]  # no id: its line number, 5 (from 1; not its place among good lines)
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("\n".join(lines) + "\n")
    args = ["--model", base, "--input", str(q), "--output", str(out), "--greedy", "--max-new-tokens", "4",
            "--min-pixels", "4096", "--max-pixels", "8192", "--device", "cpu"]
    assert infer.main(args) == 1  # finished, but says something went wrong
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "answer" in recs["ok1"] and "answer" in recs[5] and recs["ok1"]["n_generated"] == 4
    assert re.fullmatch(rf"{q}:2 id=missing field=image: missing image {tmp_path}/later\.png \(FileNotFoundError\)",
                        recs["missing"]["error"])
    assert "field=messages: must be a list" in recs["bad_messages"]["error"]
    assert recs[f"{q}:3"]["error"].startswith(f"{q}:3 id=None field=json: invalid JSON")
    assert "2 answered, 3 errors, 0 already in" in capsys.readouterr().out
    shutil.copy(img, tmp_path / "later.png")  # fix one cause, ask the errors again: only those run
    assert infer.main(args + ["--retry-errors"]) == 1
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs if "error" not in r] == ["ok1", 5, "missing"]
    assert sorted(r["id"] for r in recs if "error" in r) == sorted([f"{q}:3", "bad_messages"])
    assert "1 answered, 2 errors, 2 already in" in capsys.readouterr().out
    said = capsys.readouterr().out if infer.main(args) == 1 else ""  # the 2 errors left: exit 1, nothing asked
    assert "0 answered, 0 errors, 5 already in" in said and "(2 of them errors)" in said, said


# ---------------------------------------------------------------------------------------------------------------
# Round 3: runs that train nothing or die finite never end "done"; scoring and requests never drop or crash silently


def grpo_cfg(base, out, **kw):
    return {"model_path": base, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO), "output_dir": str(out),
            "zero_config": str(ROOT / "zero_configs" / "zero2.json"), "prompts_per_rank": 1, "num_generations": 4,
            "micro_batch_size": 4, "max_new_tokens": 8, "single_image_min_pixels": 4096,
            "single_image_max_pixels": 8192, "bf16": False, "gradient_checkpointing": False,
            "enable_thinking": False, **kw}


def test_grpo_without_reward_variance_stops(base, tmp_path):
    """Probe 1: a weak start model scores 0 on every completion (no group varies): kept_frac 0, loss 0 every step.
    The run stops at step 2 naming why, exit 1, and never exports the unchanged start model as final/."""
    out = tmp_path / "flat"
    r = run_script("grpo.py", grpo_cfg(base, out, rewards="accuracy:1", max_steps=2), tmp_path)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"grpo\.py: error: step 2: 2 of 2 steps had no learning signal: no group's rewards varied",
                     r.stderr), r.stderr[-2000:]
    assert not (out / "final").exists() and "done:" not in r.stdout
    assert [x["targets"] for x in metrics(out)] == [0, 0] and all(x["kept_frac"] == 1.0 for x in metrics(out))
    one = tmp_path / "one"  # a one-step run with no signal trained nothing either: never "done"
    r = run_script("grpo.py", grpo_cfg(base, one, rewards="accuracy:1", max_steps=1), tmp_path)
    assert r.returncode == 1 and "step 1: 1 of 1 steps had no learning signal" in r.stderr, r.stderr[-2000:]
    assert not (one / "final").exists()
    ok = tmp_path / "even"  # the same run with a reward that varies ends done
    r = run_script("grpo.py", grpo_cfg(base, ok, rewards="tests.grpo_rewards.even_ids:1", max_steps=2), tmp_path)
    assert r.returncode == 0 and (ok / "final").exists(), r.stderr[-2000:]


def test_a_run_that_dies_finite_stops(base, small_data, tmp_path):
    """Probe 2: lora.py at lr 1e6 saturates: loss stuck at ln(vocab) = 11.9312 with a zero gradient norm. The guard
    stops it after max_dead_steps such steps; no final/ adapter."""
    out = tmp_path / "dead"
    c = cfg_for(base, small_data, out, lr=1e6, warmup_ratio=0.0, schedule="constant", max_steps=8, lora_r=4,
                save_interval=1)
    r = run_script("lora.py", {k: v for k, v in c.items() if k in lora.Config.__dataclass_fields__}, tmp_path)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"lora\.py: error: step (\d+): gradient norm 0 on 3 steps in a row with \d+ target tokens \(loss "
                  r"11\.93\d\d = ln\(vocab 151936\): uniform logits\): the weights saturated", r.stderr)
    assert m, r.stderr[-2000:]
    rec = metrics(out)
    assert [x["grad_norm"] for x in rec[-3:]] == [0.0] * 3 and not (out / "final").exists()
    assert f"Last good checkpoint: {out / 'checkpoints' / f'step{int(m.group(1)) - 1:07d}'}" in r.stderr


def test_guard_stops_a_loss_that_blew_up(tmp_path):
    """A finite loss far above where it began (max_loss_ratio x the first 3 steps' mean, max_dead steps in a row);
    a noisy loss that comes back down is fine. ln(vocab) is named when the logits are uniform."""
    g = common.RunGuard(2, 1.0, False, str(tmp_path), max_dead=3, max_loss_ratio=4.0)
    losses = [1.0, 1.2, 0.8, 5.0, 0.9, 4.5, 4.2, 4.1]
    why = [g.check(s, {"loss": v, "grad_norm": 1.0, "targets": 10}, 0) for s, v in enumerate(losses, 1)]
    assert why[:7] == [""] * 7
    assert why[7].startswith("step 8: loss 4.1000 above 4x its start (1.0000, the first 3 steps' mean) on 3 steps")
    g = common.RunGuard(2, 1.0, False, str(tmp_path), max_dead=2, vocab_size=151936)
    assert g.check(1, {"loss": 11.9, "grad_norm": 0.0, "targets": 0}, 0) == ""  # no targets: not a dead gradient
    assert g.check(2, {"loss": math.log(151936), "grad_norm": 0.0, "targets": 5}, 0) == ""
    assert "= ln(vocab 151936): uniform logits" in g.check(3, {"loss": math.log(151936), "grad_norm": 0.0,
                                                               "targets": 5}, 0)


def test_score_refuses_gold_it_cannot_score(tool_ckpt, tmp_path, capsys):
    """Probes 3 and 5: a dict gold answer and a 3-number gold bbox (with a Crop that really ran) are each that record's
    error naming id and field; the others are scored, the summary is written and counts only scored records; a resume
    does not crash on them."""
    prompts = json.loads((DEMO / "grpo.json").read_text())
    reqs = [{**prompts[0], "id": "dict", "answer": {"color": "red circle"}},
            {**prompts[0], "id": "box3", "bbox": [274, 99, 286]},
            {**prompts[0], "id": "ok"}]
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    args = ["--model", tool_ckpt, "--input", str(q), "--output", str(out), "--image-dir", str(DEMO), "--tools",
            "--enable-thinking", "--greedy", "--max-new-tokens", "80", "--single-image-min-pixels", "4096",
            "--single-image-max-pixels", "8192", "--crop-min-pixels", "4096", "--crop-max-pixels", "8192", "--score"]
    assert infer.main(args) == 1
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert re.fullmatch(rf"{q}:1 id=dict field=answer: \{{'color': 'red circle'\}} is not a string, a number or a "
                        r"list of them", recs["dict"]["error"])
    assert re.fullmatch(rf"{q}:2 id=box3 field=bbox: \[274, 99, 286\] is not \[x1, y1, x2, y2\].*",
                        recs["box3"]["error"])
    assert recs["ok"]["tool_calls"][0]["name"] == "Crop" and recs["ok"]["tool_calls"][0]["ok"]
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    assert summary["questions"] == 1 and summary["errors"] == 2
    capsys.readouterr()
    assert infer.main(args) == 1 and "0 answered, 0 errors, 3 already in" in capsys.readouterr().out


def test_infer_reads_every_media_key_or_says_why(base, tmp_path):
    """Probe 4: {"prompt"} requests with video_frames / video are answered with the video (its frames reach the
    prompt); a missing frame, a fake .mp4, image + video together and an unknown key (`images`) are error records."""
    frames = [f"f{i}.png" for i in range(3)]
    for i, f in enumerate(frames):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(tmp_path / f)
    (tmp_path / "fake.mp4").write_text("not a video")
    img = "images/syn_000.png"
    shutil.copy(DEMO / img, tmp_path / "i.png")
    reqs = [{"id": "frames", "video_frames": frames, "prompt": "What happens?"},
            {"id": "missing_frame", "video_frames": [*frames[:2], "gone.png"], "prompt": "What happens?"},
            {"id": "fake_mp4", "video": "fake.mp4", "prompt": "What happens?"},
            {"id": "both", "image": "i.png", "video_frames": frames, "prompt": "What happens?"},
            {"id": "plural", "images": ["i.png"], "prompt": "What is it?"}]
    q, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    assert infer.main(["--model", base, "--input", str(q), "--output", str(out), "--image-dir", str(tmp_path),
                       "--greedy", "--max-new-tokens", "2", "--video-min-pixels", "4096", "--video-max-pixels", "4096",
                       "--min-frames", "2", "--max-frames", "4", "--device", "cpu"]) == 1
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "answer" in recs["frames"] and recs["frames"]["n_generated"] == 2
    assert re.search(rf"field=video_frames: missing video_frames {tmp_path}/gone\.png \(FileNotFoundError",
                     recs["missing_frame"]["error"]), recs["missing_frame"]["error"]
    assert f"field=video: unreadable video {tmp_path}/fake.mp4" in recs["fake_mp4"]["error"] or \
        "needs PyAV" in recs["fake_mp4"]["error"]
    assert "field=video: a sample has images or one video, not both" in recs["both"]["error"]
    assert "field=images: unknown key 'images'; a request holds id, image, video" in recs["plural"]["error"]
    # the video's frames reached the model: the prompt holds the video's visual tokens
    session = infer.load(base, device="cpu")
    r = infer.chat_batch(session, [{"video_frames": frames, "prompt": "What happens?"}], str(tmp_path),
                         max_new_tokens=1,
                         video_min_pixels=4096, video_max_pixels=4096, min_frames=2, max_frames=4, do_sample=False)[0]
    assert r.token_ids[:r.prompt_len].count(M.INDICATOR_IDS[2]) == 1  # the video start indicator


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) to mount a small tmpfs")
def test_disk_full_during_a_checkpoint_names_it(base, small_data, tmp_path):
    """Probe 6: the output_dir on a small tmpfs (100 MB: two of this LoRA run's 38 MB checkpoints, DeepSpeed keeps the
    tied embedding in them). The third save fills it: the run stops with "no space left on <path>", the checkpoints
    already written stay whole, the half-written one is removed and `latest` names the last whole one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    can = shutil.which("unshare") and subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs "
                                                      f"{mnt}"], capture_output=True).returncode == 0
    if not can:
        pytest.skip("a private mount namespace with a tmpfs is not permitted here (root / CAP_SYS_ADMIN)")
    c = cfg_for(base, small_data, mnt / "run", lr=1e-3, max_steps=40, lora_r=4, save_interval=1, keep_last=0)
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps({k: v for k, v in c.items() if k in lora.Config.__dataclass_fields__}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    script = (f"mount -t tmpfs -o size=100m tmpfs {mnt} || exit 77; {sys.executable} {ROOT / 'lora.py'} --config "
              f"{cfg_path}; rc=$?; ls {mnt}/run/checkpoints > {tmp_path}/ls.txt; cat {mnt}/run/checkpoints/latest "
              f"> {tmp_path}/latest.txt; for d in {mnt}/run/checkpoints/step*; do ls $d | wc -l; done > "
              f"{tmp_path}/files.txt; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu",
                       "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip("mounting a tmpfs is not permitted here")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert re.search(rf"lora\.py: error: no space left on {mnt}\S* \(\d+\.\d MiB free\) while writing ", r.stderr), \
        r.stderr[-2000:]
    assert "basic_ios" not in r.stderr.splitlines()[-1]
    kept = [x for x in (tmp_path / "ls.txt").read_text().split() if x.startswith("step")]
    assert kept == ["step0000001", "step0000002"] and (tmp_path / "latest.txt").read_text().strip() == kept[-1]
    assert len(set((tmp_path / "files.txt").read_text().split())) == 1  # every kept checkpoint has all its files


def test_saving_names_a_full_disk_and_passes_other_errors(tmp_path):
    """common.saving, around every write: ENOSPC / EDQUOT from any layer is "no space left on <path>" naming the last
    resumable checkpoint; any other error goes through as it is (no root needed, unlike the tmpfs probe above)."""
    import errno

    common.LAST_SAVED["path"] = "ck/step0000003"
    for code in (errno.ENOSPC, errno.EDQUOT):
        where = re.escape(str(tmp_path))
        with pytest.raises(common.RunError, match=rf"no space left on {where} \(\d+\.\d MiB free\) while writing "
                                                  rf"{where}/x/y/z\.pt\. .*last resumable checkpoint: ck/step\d+"):
            with common.saving(str(tmp_path / "x" / "y" / "z.pt")):  # (the nearest dir that exists is named)
                raise OSError(code, os.strerror(code))
    with pytest.raises(KeyError), common.saving(str(tmp_path)):
        raise KeyError("not a disk problem")


def test_config_with_a_json_syntax_error_names_the_file(tmp_path):
    """Probe 7: a trailing comma in a run config: sft / lora / grpo and data.py check say which file, line and
    column, in one line, no traceback."""
    bad = tmp_path / "run.json"
    bad.write_text('{\n  "lr": 1e-5,\n  "epochs": 2,\n}\n')
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for cmd in (["sft.py"], ["lora.py"], ["grpo.py"], ["data.py", "check"]):
        r = subprocess.run([sys.executable, *cmd, "--config", str(bad)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        name = "data.py check" if cmd[0] == "data.py" else cmd[0]
        assert r.stderr.strip() == f"{name}: error: config {bad}:4:1: not valid JSON: Expecting property name " \
                                   "enclosed in double quotes", r.stderr


def test_max_tokens_smaller_than_a_sample_is_refused(base, small_data, tmp_path):
    """Probe 8: --max_tokens=10 would put whole ~270-token samples in each row, beyond the bound a GPU run is sized
    by: refused at start, naming the longest sample and the smallest max_tokens that fits."""
    out = tmp_path / "mt"
    r = run_script("sft.py", cfg_for(base, small_data, out, max_tokens=10, max_steps=2), tmp_path)
    assert r.returncode == 1
    m = re.search(rf"sft\.py: error: max_tokens 10 is smaller than the longest sample \({small_data}:(\d+) id=(\S+), "
                  r"(\d+) tokens\): a packed row holds whole samples\. Set max_tokens >= (\d+)", r.stderr)
    assert m and m.group(3) == m.group(4) and int(m.group(3)) > 200, r.stderr[-2000:]
    assert not (out / "checkpoints").exists() and "model:" not in r.stdout  # before any model loads


def test_small_mends(base, small_data, tmp_path, tokenizer, capsys):
    """Truncation is counted; infer checks --tools before it loads a model; a relaunch that fails its checks keeps
    the recorded config.json; a user tool's crash keeps its type and logs one traceback; a video error names its path
    once; a missing frame is caught by the length pass."""
    logs = []
    ds = data.SFTDataset(str(DEMO / "sft.json"), tokenizer, str(DEMO), log=logs.append, max_length=250,
                         overlong="truncate", single_image_min_pixels=4096, single_image_max_pixels=20480,
                         crop_min_pixels=4096, crop_max_pixels=8192)  # every demo sample: 267..275 tokens
    assert ds.stats["truncated (overlong: truncate)"] == len(ds) == 48 and "'truncated (overlong: truncate)': 48" \
        in logs[-1]
    empty = tmp_path / "weightless"  # config and tokenizer, no weights: loading it would fail
    shutil.copytree(ROOT / "assets" / "tiny", empty)
    with pytest.raises(SystemExit):
        infer.main(["--model", str(empty), "--prompt", "hi", "--tools", "Crop|nope.mod:Nope"])
    assert "infer.py: error: tools: cannot import 'nope.mod:Nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a missing --image: said before the (weightless) model would load
        infer.main(["--model", str(empty), "--prompt", "hi", "--image", str(tmp_path / "gone.png")])
    err = capsys.readouterr().err
    assert "infer.py: error:" in err and "gone.png" in err and "Traceback" not in err, err
    out = tmp_path / "run"
    assert run_script("sft.py", cfg_for(base, small_data, out, max_steps=1), tmp_path).returncode == 0
    recorded = (out / "config.json").read_text()
    r = run_script("sft.py", cfg_for(base, small_data, out, max_steps=2, resume="auto", tools="Crop|Nope"), tmp_path)
    assert r.returncode == 1 and (out / "config.json").read_text() == recorded

    class Broken(tools.Tool):
        name = "Broken"

        def run(self, args, images, keys):
            raise KeyError("lost")

    reg = tools.Registry([Broken()])
    res = [reg.execute("<tool_call>Broken [1, 2, 3, 4]</tool_call>", [], []) for _ in range(2)]
    assert res[0].error and res[0].text == "Error: KeyError: 'lost'" == res[1].text
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "warning: tool Broken raised KeyError" in err
    need = data._need({"_file": "f.json", "_index": 3, "id": "v"})
    with pytest.raises(data.SampleError) as e:
        data._video({"video": "nope.mp4"}, str(tmp_path), data.Budgets(), False, need)
    assert str(e.value).count(str(tmp_path / "nope.mp4")) == 1, str(e.value)
    Image.new("RGB", (32, 32)).save(tmp_path / "f0.png")
    vid = {"id": "v", "video_frames": ["f0.png", "gone.png"], "conversations": [
        {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]}
    (tmp_path / "v.json").write_text(json.dumps([vid]))
    ds = data.SFTDataset(str(tmp_path / "v.json"), tokenizer, str(tmp_path), log=lambda *a: None, min_frames=2,
                         max_frames=2, video_min_pixels=1024, video_max_pixels=4096)
    assert len(ds) == 0 and ds.skipped == {"video_frames": 1} and "missing frame" in ds.errors[0].why


def test_ctrl_c_names_the_last_checkpoint(base, small_data, tmp_path):
    """KeyboardInterrupt: no traceback; the message names the last resumable checkpoint; exit code 130."""
    out = tmp_path / "int"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(cfg_for(base, small_data, out, max_steps=400, save_interval=1, keep_last=1)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    p = subprocess.Popen([sys.executable, str(ROOT / "sft.py"), "--config", str(cfg)], cwd=ROOT,
                         env={**env, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "latest").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    m = re.search(r"sft\.py: interrupted\. Last resumable checkpoint: (\S+) \(run again with --resume=auto", err)
    assert m and os.path.isdir(m.group(1)) and m.group(1).startswith(str(out / "checkpoints" / "step")), err[-2000:]
