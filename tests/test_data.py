"""data.py: official ids/labels (golden set A), tool-turn rendering and masking, packing, the checker."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import data_check
import model as M
import tools

FIX = Path(__file__).parent / "fixtures"
GOLD, IMG, DATA = FIX / "golden_a", FIX / "golden_a" / "images", FIX / "data"
TRAIN = json.loads((GOLD / "train_labels.json").read_text())["train"]
BUDGET = {k: v for k, v in TRAIN["training_args"].items() if k.endswith("_pixels")}  # 4096..20480 / 8192
TOOLS = {s["id"]: s for s in json.loads((DATA / "tools.json").read_text())}
SMALL = dict(BUDGET, crop_min_pixels=4096, crop_max_pixels=8192)
VIS = lambda n: [-301] + [-300] * n + [-302]  # noqa: E731


def tok(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def golden_samples(tokenizer):
    return [data.encode_sample(s["sample"], tokenizer, IMG, **BUDGET) for s in TRAIN["samples"]]


# ---------------------------------------------------------------------------------------------------------------
# golden set A: the official formatter (training) and preprocess_inputs (inference), exactly


@pytest.mark.parametrize("i", range(4))
def test_golden_train_labels(tokenizer, i):
    gold, tensors = TRAIN["samples"][i], load_file(str(GOLD / "train_labels.safetensors"))
    out = data.encode_sample(gold["sample"], tokenizer, IMG, **BUDGET)
    assert out["input_ids"].tolist() == gold["input_ids"]
    assert out["labels"].tolist() == gold["labels"]
    if gold["grid_thws"] is None:
        assert out["grid_thws"] is None and out["pixel_values"] is None
    else:
        assert out["grid_thws"].tolist() == gold["grid_thws"]
        assert torch.equal(out["pixel_values"], tensors[f"{gold['id']}.pixel_values"])
    lite = data.encode_sample(gold["sample"], tokenizer, IMG, with_pixels=False, **BUDGET)  # the length pass
    assert torch.equal(lite["input_ids"], out["input_ids"]) and lite["pixel_values"] is None


@pytest.mark.parametrize("i", range(4))
def test_golden_truncation(tokenizer, i):
    gold = TRAIN["truncation"][i]
    sample = next(s["sample"] for s in TRAIN["samples"] if s["id"] == gold["id"])
    kw = dict(max_length=23, text_max_length=10, **BUDGET)
    out = data.encode_sample(sample, tokenizer, IMG, overlong="truncate", **kw)
    assert out["input_ids"].tolist() == gold["input_ids"] and out["labels"].tolist() == gold["labels"]
    assert (out["grid_thws"].tolist() if out["grid_thws"] is not None else None) == gold["grid_thws"]
    assert (len(out["pixel_values"]) if out["pixel_values"] is not None else None) == gold["n_pixel_rows"]
    with pytest.raises(data.SampleError, match="max_length") as e:  # default policy: drop, reported
        data.encode_sample(sample, tokenizer, IMG, **kw)
    assert e.value.field == "length"


def _messages(msgs):
    def item(it):
        if it["type"] == "image":
            return {**it, "image": Image.open(IMG / f"{it['image']}.png")}
        if it["type"] == "video":
            return {**it, "video": [Image.open(IMG / f"{f}.png") for f in it["video"]]}
        return it
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [item(i) for i in m["content"]]}
            for m in msgs]


@pytest.mark.parametrize("case", json.loads((GOLD / "inputs.json").read_text()), ids=lambda c: c["name"])
def test_golden_build_inputs(tokenizer, case):
    tensors = load_file(str(GOLD / "inputs.safetensors"))
    msgs = _messages(case["messages"])
    kw = dict(enable_thinking=case["enable_thinking"], add_generation_prompt=case["add_generation_prompt"])
    out = M.build_inputs(msgs, tokenizer, min_pixels=case["min_pixels"], max_pixels=case["max_pixels"], **kw)
    assert out["prompt"] == case["prompt"] == tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    assert torch.equal(out["input_ids"], tensors[f"{case['name']}.input_ids"])
    if case["grid_thws"] is None:
        assert out["pixel_values"] is None and out["grid_thws"] is None
    else:
        assert torch.equal(out["pixel_values"], tensors[f"{case['name']}.pixel_values"])
        assert out["grid_thws"].tolist() == case["grid_thws"]


# ---------------------------------------------------------------------------------------------------------------
# tool turns: hand-built expected ids and masks


def test_crop_turn_hand_checked(tokenizer):
    out = data.encode_sample(TOOLS["crop"], tokenizer, IMG, **SMALL)
    img = Image.open(IMG / "img3.png").convert("RGB")
    pv0, g0 = M.preprocess_image(img, 4096, 20480)
    pv1, g1 = M.preprocess_image(img.crop((10, 20, 110, 90)), 4096, 8192)  # the crop: its own budget
    t = lambda s: tok(tokenizer, s)  # noqa: E731
    head = (t("<|im_start|>system\n" + TOOLS["crop"]["conversations"][0]["value"] + "<|im_end|>\n")
            + t("<|im_start|>user\n") + VIS(M.num_visual_tokens(g0[0]))
            + t("\nWhat is written on the sign?<|im_end|>\n") + t("<|im_start|>assistant\n"))
    call = t("<think>\nThe sign is small. <tool_call>Crop [10, 20, 110, 90]</tool_call>")
    crop = VIS(M.num_visual_tokens(g1[0]))
    rest = t("\nNow it is readable.\n</think>\n\n<answer>EXIT</answer><|im_end|>")
    assert call[-1] == 151658 and rest[-1] == M.IM_END_ID  # </tool_call>, then the crop right after it
    assert out["input_ids"].tolist() == head + call + crop + rest
    assert out["labels"].tolist() == [-100] * len(head) + call + [-100] * len(crop) + rest  # call + im_end learned
    assert torch.equal(out["pixel_values"], torch.cat([pv0, pv1]))
    assert torch.equal(out["grid_thws"], torch.cat([g0, g1]))
    assert out["tool_calls"] == {"Crop": 1} and out["auto_crops"] == 0


def test_identify_turn_hand_checked(tokenizer):
    out = data.encode_sample(TOOLS["identify"], tokenizer, IMG, **SMALL)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    t = lambda s: tok(tokenizer, s)  # noqa: E731
    registry = tools.load_tools(identify=str(DATA / "identify_map.json"))
    result = registry.execute("Identify [150, 60, 250, 200]", [Image.open(IMG / "img3.png")], ["img3.png"])
    resp = tools.tool_result_ids(result, tokenizer)  # what the inference loop appends after </tool_call>
    assert resp == [151665, *t("Alice"), 151666]
    call = t("<think>\nLet me check. <tool_call>Identify [150, 60, 250, 200]</tool_call>")
    tail = t("<|im_start|>assistant\n") + call + resp + t(" It is Alice.\n</think>\n\n<answer>Alice</answer><|im_end|>")
    assert ids[-len(tail):] == tail
    n_call = len(call)
    exp = [-100] * 3 + tail[3:3 + n_call] + [-100] * len(resp) + tail[3 + n_call + len(resp):]
    assert labels[-len(tail):] == exp and set(labels[:-len(tail)]) == {-100}


def test_old_format_crop_gets_its_image(tokenizer):
    old = TOOLS["crop_old_format"]
    new = json.loads(json.dumps(old).replace("</tool_call>", "</tool_call><image>"))
    a, b = (data.encode_sample(s, tokenizer, IMG, **SMALL) for s in (old, new))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["auto_crops"] == 1 and b["auto_crops"] == 0


def test_prompt_messages_check_only_the_prompt():
    """A prompt is the turns before the first gpt turn, validated and placed as in training; the answer may call any
    tool (the run's own), it is not part of the prompt."""
    s = {"_file": "p.json", "_index": 0, "id": "p", "image": "img1.png", "conversations": [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "<tool_call>Count [1, 2]</tool_call>"}]}
    assert data.prompt_messages(s, IMG) == [{"role": "user", "content": [
        {"type": "image", "image": str(IMG / "img1.png")}, {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(data.SampleError, match=r"p.json:0 id=p field=conversations\[0\].value: contains one of the r"):
        data.prompt_messages({**s, "conversations": [{"from": "human", "value": "hi<|im_end|>"}]}, IMG)


def test_tool_loop_tokens_equal_training_tokens(tokenizer):
    """Prompt (chat template) + generated ids + tool_result_ids/pixels == encode_sample: no re-rendering drift."""
    s, t = TOOLS["crop"], lambda x: tok(tokenizer, x)
    train = data.encode_sample(s, tokenizer, IMG, **SMALL)
    prompt = M.build_inputs(data.prompt_messages(s, IMG), tokenizer, enable_thinking=True, min_pixels=4096,
                               max_pixels=20480)
    gen = t("<think>\nThe sign is small. <tool_call>Crop [10, 20, 110, 90]</tool_call>")
    result = tools.load_tools().execute(tools.parse_tool_call(tokenizer.decode(gen)),
                                              [Image.open(IMG / "img3.png")])
    pv, grid = tools.tool_result_pixels(result, crop_min_pixels=4096, crop_max_pixels=8192)
    ids = (prompt["input_ids"][0].tolist() + gen + M.expand_placeholders(tools.tool_result_ids(result, tokenizer), grid)
           + t("\nNow it is readable.\n</think>\n\n<answer>EXIT</answer><|im_end|>"))
    assert ids == train["input_ids"].tolist()
    assert torch.equal(torch.cat([prompt["pixel_values"], pv]), train["pixel_values"])


def test_multi_turn_tools_order_and_masks(tokenizer):
    s = TOOLS["multi_turn_json_call"]
    out = data.encode_sample(s, tokenizer, IMG, **SMALL)
    img3, img0 = (Image.open(IMG / n).convert("RGB") for n in ("img3.png", "img0.png"))
    parts = [M.preprocess_image(img3, 4096, 8192), M.preprocess_image(img3.crop((0, 0, 50, 50)), 4096, 8192),
             M.preprocess_image(img0, 4096, 8192)]  # placeholder order: image 1, crop (gpt 1), image 2
    assert torch.equal(out["pixel_values"], torch.cat([p for p, _ in parts]))
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    assert all(lab == -100 for i, lab in zip(ids, labels) if i < 0)  # no visual token is ever learned
    r0, r1 = ids.index(151665), ids.index(151666)
    assert set(labels[r0:r1 + 1]) == {-100} and labels[r0 - 1] == 151658 and labels[r1 + 1] != -100
    last = len(ids) - 1 - ids[::-1].index(151644)  # the final assistant turn: its inserted empty think unlearned
    assert ids[last + 3:last + 7] == [151667, 271, 151668, 271] and set(labels[last:last + 7]) == {-100}
    assert labels[-1] == M.IM_END_ID and out["tool_calls"] == {"Crop": 1, "Identify": 1}


def _sample(gpt, image="img3.png", **extra):
    q = "<image>\nQ?" if image else "Q?"
    s = {"id": "x", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": gpt}]}
    return {**s, "image": image, **extra} if image else s


@pytest.mark.parametrize("sample, field, why", [
    (_sample("<tool_call>Zoom [1, 2, 3, 4]</tool_call><image>ok"), "conversations[1].value", "unknown tool"),
    (_sample("<tool_call>Identify [1, 2, 30, 40]</tool_call> ok"), "conversations[1].value", "<tool_response>"),
    (_sample("<tool_call>Crop [5, 5, 5, 50]</tool_call><image>ok"), "conversations[1].value", "zero area"),
    (_sample("<tool_call>Crop [1, 2, 3]</tool_call><image>ok"), "conversations[1].value", "4 numbers"),
    (_sample("look <image> here"), "conversations[1].value", "directly follow"),
    (_sample("<tool_call>Crop [1, 2, 40, 40]</tool_call>\n<image>"), "conversations[1].value", "directly follow"),
    (_sample("<tool_call>Crop [1, 2, 40, 40]"), "conversations[1].value", "unbalanced"),
    (_sample("<tool_response>x</tool_response>"), "conversations[1].value", "directly follow"),
    (_sample("a<|endoftext|>"), "conversations[1].value", "reserved"),
    (_sample("ok", image=["img3.png", "img0.png"]), "image", "placeholders"),
    (_sample("<tool_call>Crop [1, 2, 40, 40]</tool_call>", image=None), "image", "no image"),
    (_sample("ok", image="nope.png"), "image", "missing"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations", "no gpt turn"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0]", "from"),
])
def test_bad_samples_name_the_field(tokenizer, sample, field, why):
    with pytest.raises(data.SampleError) as e:
        data.encode_sample(sample, tokenizer, IMG, **SMALL)
    assert e.value.field == field and why in e.value.why


def test_recorded_error_response_is_fine(tokenizer):
    s = _sample("<tool_call>Zoom [1, 2, 3, 4]</tool_call><tool_response>Error: unknown tool</tool_response>So no.")
    out = data.encode_sample(s, tokenizer, IMG, **SMALL)
    assert out["tool_calls"] == {"Zoom": 1}


def test_pixel_budgets(tokenizer):
    kw = dict(single_image_min_pixels=4096, single_image_max_pixels=40960, multiple_image_min_pixels=1024,
              multiple_image_max_pixels=8192, crop_min_pixels=2048, crop_max_pixels=4096)
    one = data.encode_sample(_sample("<tool_call>Crop [0, 0, 200, 200]</tool_call>"), tokenizer, IMG, **kw)
    assert one["grid_thws"].tolist() == [[1, *(x // 16 for x in M.smart_resize(220, 300, 32, 4096, 40960))],
                                         [1, *(x // 16 for x in M.smart_resize(200, 200, 32, 2048, 4096))]]
    two = _sample("ok", image=["img3.png", "img3.png"])
    two["conversations"][0]["value"] = "<image><image>Q?"
    grids = data.encode_sample(two, tokenizer, IMG, **{**kw, "multiple_image_max_pixels": -1})["grid_thws"]
    assert grids.tolist() == [[1, *(x // 16 for x in M.smart_resize(220, 300, 32, 1024, 40960 // 2))]] * 2


# ---------------------------------------------------------------------------------------------------------------
# packing, sharding, collation, dataset


def test_collate_packed_rows(tokenizer):
    s1, s2, s3, s4 = golden_samples(tokenizer)
    b = data.collate([[s1, s3], [s2], [None]])
    T = max(len(s1["input_ids"]) + len(s3["input_ids"]), len(s2["input_ids"]))
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (2, T)  # empty row dropped
    n1, n3 = len(s1["input_ids"]), len(s3["input_ids"])
    assert b["position_ids"][0].tolist() == list(range(n1)) + list(range(n3)) + list(range(T - n1 - n3))
    assert torch.equal(b["input_ids"][0, :n1 + n3], torch.cat([s1["input_ids"], s3["input_ids"]]))
    assert set(b["input_ids"][0, n1 + n3:].tolist()) <= {M.PAD_ID} and set(b["labels"][0, n1 + n3:].tolist()) <= {-100}
    assert torch.equal(b["pixel_values"], torch.cat([s1["pixel_values"], s2["pixel_values"]]))  # row-major order
    assert b["n_target_tokens"] == sum(int((s["labels"] != -100).sum()) for s in (s1, s2, s3))
    text = data.collate([[s3]])
    assert text["pixel_values"] is None and text["grid_thws"] is None  # the model runs its own dummy image
    batch = data.collate([[s1], [s2], [s3]])  # one sample per row == the official collator's batch, unpadded part
    gold = load_file(str(GOLD / "train_labels.safetensors"))
    assert torch.equal(batch["input_ids"], gold["batch.input_ids"][:, :batch["input_ids"].shape[1]])
    assert torch.equal(batch["labels"], gold["batch.labels"][:, :batch["labels"].shape[1]])
    assert torch.equal(batch["pixel_values"], gold["batch.pixel_values"])


def test_packed_loss_equals_one_by_one(tokenizer):
    m = M.Ovis25.from_pretrained(str(GOLD / "model")).eval()
    samples, losses = golden_samples(tokenizer), load_file(str(GOLD / "train_labels.safetensors"))
    with torch.no_grad():
        total, n, checked = 0.0, 0, 0
        for s, gold in zip(samples, TRAIN["samples"]):
            one = data.collate([[s]])
            loss = m.forward(one["input_ids"], pixel_values=one["pixel_values"], grid_thws=one["grid_thws"],
                             labels=one["labels"], position_ids=one["position_ids"], loss_reduction="sum").loss
            ref = losses.get(f"{gold['id']}.loss")  # the official single-sample loss (s1-s3)
            checked += ref is not None
            assert ref is None or abs(float(loss) / one["n_target_tokens"] - float(ref)) < 1e-4
            total, n = total + float(loss), n + one["n_target_tokens"]
        b = data.collate([[samples[0], samples[1]], [samples[2], samples[3]]])
        packed = m.forward(b["input_ids"], pixel_values=b["pixel_values"], grid_thws=b["grid_thws"],
                           labels=b["labels"], position_ids=b["position_ids"], loss_reduction="sum").loss
    assert checked == 3  # s1-s3 have an official loss: a renamed key must not skip the comparison
    assert b["n_target_tokens"] == n
    assert abs(float(packed) / n - total / n) < 1e-4


def test_dataset_skips_and_counts(tokenizer):
    logs = []
    ds = data.SFTDataset(DATA / "bad.jsonl", tokenizer, FIX, log=logs.append, max_length=300, **SMALL)
    assert [s["id"] for s in ds.samples] == ["ok_image", "corrupt_image", "ok_text"]  # header-only length pass
    assert ds.skipped == {"json": 1, "image": 1, "conversations": 4, "over-long": 1}
    assert "skipped 7" in logs[-1]
    assert ds[1] is None  # corrupt pixels: None, never a crash; collate counts it
    loader, n_steps = data.micro_batches(ds, max_tokens=256, grad_accum=1)
    batches = list(loader)
    assert len(batches) == n_steps == len(common.plan_epoch(ds.lengths, 256)) and \
        sum(b["n_samples"] for b in batches) == 2
    assert sum(b["n_failed"] for b in batches) == 1
    resumed, _ = data.micro_batches(ds, max_tokens=256, start_step=1)
    assert [b["input_ids"].tolist() for b in resumed] == [b["input_ids"].tolist() for b in batches[1:]]


def test_check_report(capsys):
    rc = data_check.check(["--data", str(DATA / "bad.jsonl"), "--image_dir", str(FIX), "--max_length", "300"])
    out = capsys.readouterr().out
    bad = {line.split(" id=")[1].split()[0]: line for line in out.splitlines() if line.startswith("BAD ")}
    assert rc == 1 and "bad.jsonl:2 id=None field=json" in out  # the line an editor shows
    for sid, fld in [("missing_image", "image"), ("corrupt_image", "image"), ("bad_bbox", "conversations[1].value"),
                     ("bad_bbox_text", "conversations[1].value"), ("unknown_tool", "conversations[1].value"),
                     ("no_gpt_turn", "conversations"), ("over_long", "length")]:
        assert f"field={fld}:" in bad[sid]
    assert "samples 10: ok 2, bad 8, over-long 1" in out and "p50" in out


def test_check_cli_ok():
    r = subprocess.run([sys.executable, "data.py", "check", "--data", str(DATA / "tools.json"), "--image_dir",
                        str(IMG)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bad 0" in r.stdout and "calls Crop 3" in r.stdout and "old-format crops given their image 1" in r.stdout


def test_check_config_uses_eval_image_dir_and_validates_grpo_prompts(tmp_path, capsys):
    """--config: eval files are read under eval_image_dir (else image_dir); a GRPO config's files are prompts (image +
    question), checked as grpo.py loads them, not as conversations."""
    demo = Path(__file__).parent.parent / "data" / "demo"
    (tmp_path / "ev").mkdir()
    shutil.copy(demo / "sample_small.png", tmp_path / "ev" / "only_eval.png")  # exists only under eval_image_dir
    sft_eval = [{**json.loads((demo / "sft.json").read_text())[0], "image": "only_eval.png", "id": "e0"}]
    grpo_eval = [{**json.loads((demo / "grpo.json").read_text())[0], "image": "only_eval.png", "id": "g0"}]
    (tmp_path / "sft_eval.json").write_text(json.dumps(sft_eval))
    (tmp_path / "grpo_eval.json").write_text(json.dumps(grpo_eval))
    run = {"image_dir": str(demo), "eval_image_dir": str(tmp_path / "ev"), "max_length": 2048}
    cases = [({**run, "data_path": str(demo / "sft.json"), "eval_data_path": str(tmp_path / "sft_eval.json")},
              f"ok {len(json.loads((demo / 'sft.json').read_text())) + 1}, bad 0"),
             ({**run, "data_path": str(demo / "grpo.json"), "eval_data_path": str(tmp_path / "grpo_eval.json"),
               "rewards": "accuracy:1"}, f"prompts {len(json.loads((demo / 'grpo.json').read_text())) + 1}: ok")]
    for cfg, ok in cases:
        for eval_dir, rc in ((str(tmp_path / "ev"), 0), (None, 1)):  # without eval_image_dir: only_eval.png is missing
            (tmp_path / "run.json").write_text(json.dumps({**cfg, "eval_image_dir": eval_dir}))
            assert data_check.check(["--config", str(tmp_path / "run.json")]) == rc
            out = capsys.readouterr().out
            assert (ok in out) if rc == 0 else ("field=image" in out and ("id=e0" in out or "id=g0" in out)), out
    cfg = {**cases[1][0], "eval_data_path": None}
    bad = {**grpo_eval[0], "image": "images/syn_000.png", "bbox": [9, 9, 1, 1]}
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    (tmp_path / "run.json").write_text(json.dumps({**cfg, "data_path": str(tmp_path / "bad.json")}))
    assert data_check.check(["--config", str(tmp_path / "run.json")]) == 1
    assert "bad.json:1 id=g0 field=bbox" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_load_samples_formats(tmp_path):
    sample = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "gallery.json").write_text(json.dumps({"conversations": [sample, sample]}))  # the seed's gallery
    (tmp_path / "one.json").write_text(json.dumps(sample))
    (tmp_path / "broken.json").write_text('[{"conversations": []}, {')
    (tmp_path / "mixed.jsonl").write_text(json.dumps(sample) + "\n\n[1]\n" + json.dumps(sample) + "\n")
    assert len(data.load_samples(tmp_path / "gallery.json")) == 2 and len(data.load_samples(tmp_path / "one.json")) == 1
    errors = []
    assert data.load_samples(tmp_path / "broken.json", errors) == [] and errors[0].field == "json"
    got = data.load_samples(tmp_path / "mixed.jsonl", errors)
    assert [s["_index"] for s in got] == [1, 4] and "not an object" in errors[1].why  # lines from 1
    with pytest.raises(data.SampleError):
        data.load_samples(tmp_path / "mixed.jsonl")


def test_grpo_demo_grounding_set_matches_its_pictures(tmp_path):
    """data/make_synthetic.py --grounding (the GRPO demo's data): every gold colour is the colour of the pixels in the
    gold box (the top-left square), every SFT crop is one of the four squares and says that square's colour, and the
    committed set in data/demo/ground is what the generator writes with the demo's seed."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
    import make_synthetic as mk

    subprocess.run([sys.executable, str(Path(__file__).parent.parent / "data" / "make_synthetic.py"), "--out",
                    str(tmp_path), "--grounding", "128", "64", "--seed", "1"], check=True, capture_output=True)
    names = {rgb: c for c, rgb in mk.COLORS.items()}

    def colour_in(path, box):  # the one palette colour that fills the box
        with Image.open(path) as im:
            px = set(im.convert("RGB").crop(tuple(box)).getdata())
        assert len(px) == 1, f"{path}: box {box} is not one flat colour"
        return names[px.pop()]

    prompts = json.loads((tmp_path / "ground" / "grpo.json").read_text())
    held_out = json.loads((tmp_path / "ground" / "eval.json").read_text())
    sft = json.loads((tmp_path / "ground" / "sft.json").read_text())
    assert (len(prompts), len(held_out), len(sft)) == (128, 64, 128)
    assert {p["image"] for p in prompts}.isdisjoint(p["image"] for p in held_out)  # held-out pictures are new
    for p in prompts + held_out:
        assert p["bbox"] == [32, 32, 64, 64] and "top left" in p["conversations"][-1]["value"]
        assert colour_in(tmp_path / p["image"], p["bbox"]) == p["answer"]
    seen = set()
    for s in sft:
        reply = s["conversations"][-1]["value"]
        box = json.loads(reply.split("Crop ")[1].split("</tool_call>")[0])
        seen.add(tuple(box))
        said = reply.split("<answer>")[1].split("</answer>")[0]
        assert f"It is {said}." in reply and colour_in(tmp_path / s["image"], box) == said
    assert seen == {(x, y, x + 32, y + 32) for x, y in mk.SPOTS.values()}  # the SFT start is shown every square
    tokenizer = M.load_tokenizer(str(Path(__file__).parent.parent / "assets" / "tiny"))
    ds = data.SFTDataset([str(tmp_path / "ground" / "sft.json")], tokenizer, str(tmp_path), log=lambda *_: None,
                         registry=tools.load_tools("Crop", "pixel"), **SMALL)
    assert len(ds) == 128 and not ds.errors and ds.stats["calls Crop"] == 128
    committed = Path(__file__).parent.parent / "data" / "demo" / "ground"
    for fn in ("sft.json", "grpo.json", "eval.json"):
        assert json.loads((committed / fn).read_text()) == json.loads((tmp_path / "ground" / fn).read_text())
    for p in prompts[:4] + held_out[:4]:
        with Image.open(committed.parent / p["image"]) as a, Image.open(tmp_path / p["image"]) as b:
            assert list(a.convert("RGB").getdata()) == list(b.convert("RGB").getdata())
