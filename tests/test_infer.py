"""The tool loop (tools.run_tool_loop) and infer.py on a tiny random Ovis2.5 overfitted, in-process, on ONE
tool-calling sample: Crop (image result), Identify (map answer), a malformed call, an unknown tool and one call too
many, each answered the way training renders it. Greedy decoding must then replay the sample token for token."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import infer
import model as M
import tools

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
IMAGE_KEY = "images/syn_000.png"
IDENTIFY_MAP = str(DEMO / "identify_map.json")
PX = dict(min_pixels=32 * 32, max_pixels=64 * 64)  # small images: fast training
CROP_PX = dict(crop_min_pixels=32 * 32, crop_max_pixels=64 * 64)
CROP_BOX = [265, 90, 295, 120]
QUESTION = "<image>\nWhat color is the small square in the image?"


def _answer_text() -> str:
    reg = tools.load_tools(bbox_format="pixel", identify=IDENTIFY_MAP)
    img = Image.new("RGB", (320, 240))
    err = {c: reg.execute(c, [img], [IMAGE_KEY]).text for c in ("Crop 1 2 x", "Zoom [1, 2, 3, 4]")}
    return ("<think>\nZoom. <tool_call>Crop [265, 90, 295, 120]</tool_call><image>\nName? <tool_call>Identify "
            "[57, 120, 119, 182]</tool_call><tool_response>blue square</tool_response>\n<tool_call>Crop 1 2 x"
            f"</tool_call><tool_response>{err['Crop 1 2 x']}</tool_response>\n<tool_call>Zoom [1, 2, 3, 4]"
            f"</tool_call><tool_response>{err['Zoom [1, 2, 3, 4]']}</tool_response>\n<tool_call>Crop [0, 0, 64, 64]"
            "</tool_call><tool_response>Error: no more tool calls are available; give your final answer."
            "</tool_response>\n</think>\n\n<answer>green</answer>")


SYSTEM = {"from": "system", "value": tools.load_tools().system_prompt()}  # what infer.py adds with tools on
SAMPLE = {"id": "t0", "image": IMAGE_KEY, "conversations": [SYSTEM, {"from": "human", "value": QUESTION}]}


@pytest.fixture(scope="module")
def trained(tokenizer):
    """(model, sample, training encoding): AdamW on one sample until greedy decoding reproduces every target."""
    sample = {**SAMPLE, "conversations": SAMPLE["conversations"] + [{"from": "gpt", "value": _answer_text()}]}
    enc = data.encode_sample(sample, tokenizer, DEMO, registry=tools.load_tools(identify=IDENTIFY_MAP),
                             single_image_min_pixels=PX["min_pixels"], single_image_max_pixels=PX["max_pixels"],
                             **CROP_PX)
    torch.manual_seed(0)
    m = M.Ovis25.from_config(json.loads((ROOT / "assets" / "tiny" / "config.json").read_text()))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)  # ~64 steps, ~20 s on 2 idle cores
    ids, labels, kw = enc["input_ids"][None], enc["labels"][None], dict(pixel_values=enc["pixel_values"],
                                                                         grid_thws=enc["grid_thws"])
    tgt = labels[0, 1:] != M.IGNORE_ID
    for step in range(400):
        m.train()
        loss = m(ids, labels=labels, **kw).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.5 and step % 4 == 3:
            m.eval()
            with torch.no_grad():
                pred = m(ids, **kw).logits[0, :-1].argmax(-1)
            if bool((pred[tgt] == ids[0, 1:][tgt]).all()):
                break
    else:
        pytest.fail(f"the tiny model did not memorise the sample (loss {loss.item():.3f})")
    return m.eval(), sample, enc


def _prompt(tokenizer, question=QUESTION, image=IMAGE_KEY):
    s = {"image": image, "conversations": [SYSTEM, {"from": "human", "value": question}]}
    return M.build_inputs(data.prompt_messages(s, DEMO), tokenizer, enable_thinking=True, **PX)


def _run(m, tokenizer, prompts, images=None, **kw):
    images = images or [IMAGE_KEY] * len(prompts)
    opened = [[Image.open(DEMO / i).convert("RGB")] for i in images]
    kw = {"registry": tools.load_tools(identify=IDENTIFY_MAP), "max_tool_calls": 4, "max_new_tokens": 200,
          "do_sample": False, **CROP_PX, **kw}
    return tools.run_tool_loop(m, tokenizer, prompts, images=opened, keys=[[i] for i in images], **kw)


def test_loop_replays_the_training_encoding(trained, tokenizer):
    m, sample, enc = trained
    (r,) = _run(m, tokenizer, [_prompt(tokenizer)])
    assert r.token_ids == enc["input_ids"].tolist()  # prompt + sampled + inserted = the training rendering
    assert r.gen_mask == (enc["labels"] != M.IGNORE_ID).long().tolist()  # sampled = exactly the learned tokens
    assert r.prompt_len == len(_prompt(tokenizer)["input_ids"][0]) and r.finish == "eos"
    calls = [(c["name"], c["args"], c["ok"], c["result"]) for c in r.tool_calls]
    assert calls[:2] == [("Crop", CROP_BOX, True, None), ("Identify", [57, 120, 119, 182], True, "blue square")]
    assert [c[:3] for c in calls[2:]] == [("Crop", None, False), ("Zoom", [1, 2, 3, 4], False), ("Crop", [0, 0, 64, 64],
                                                                                                   False)]
    assert calls[2][3].startswith("Error: arguments of Crop") and calls[3][3].startswith("Error: unknown tool")
    assert calls[4][3] == tools.NO_MORE_TOOLS == "Error: no more tool calls are available; give your final answer."
    # the crop: cut at the memorised box from the original image, pixels = training's
    img = Image.open(DEMO / IMAGE_KEY).convert("RGB")
    expected = img.crop(tools.crop_box(CROP_BOX, img.size))
    assert len(r.crops) == 1 and list(r.crops[0].getdata()) == list(expected.getdata())
    pv, g = M.preprocess_image(expected, CROP_PX["crop_min_pixels"], CROP_PX["crop_max_pixels"])
    assert torch.equal(r.pixel_values[-pv.shape[0]:], pv) and torch.equal(r.grid_thws[-1:], g)
    assert torch.equal(r.pixel_values, enc["pixel_values"]) and torch.equal(r.grid_thws, enc["grid_thws"])
    assert r.answer == "green" and r.thinking.startswith("Zoom.") and "blue square" in r.thinking
    assert r.text.count("<image>") == 1 and r.n_generated == sum(r.gen_mask)


def test_kv_continuation_equals_reprefill(trained, tokenizer):
    m, _, _ = trained
    prompts = [_prompt(tokenizer), _prompt(tokenizer, "<image>\nWhat is in the top left corner of this picture?",
                                           "images/syn_001.png")]
    images = [IMAGE_KEY, "images/syn_001.png"]
    kv, ref = _run(m, tokenizer, prompts, images), _run(m, tokenizer, prompts, images, kv_cache=False)
    for a, b in zip(kv, ref):
        assert (a.token_ids, a.gen_mask, a.tool_calls, a.text) == (b.token_ids, b.gen_mask, b.tool_calls, b.text)
    assert len(kv[0].tool_calls) == 5


def test_batch_equals_one_by_one(trained, tokenizer):
    m, _, _ = trained
    qs = [(QUESTION, IMAGE_KEY), ("<image>\nAnd here?", "images/syn_002.png"), (QUESTION, "images/syn_003.png")]
    prompts, images = [_prompt(tokenizer, q, i) for q, i in qs], [i for _, i in qs]
    batch = _run(m, tokenizer, prompts, images, max_tool_calls=2, max_new_tokens=120)
    for k in range(len(qs)):
        (one,) = _run(m, tokenizer, [prompts[k]], [images[k]], max_tool_calls=2, max_new_tokens=120)
        b = batch[k]
        assert (b.token_ids, b.gen_mask, b.tool_calls, b.text, b.finish) == \
               (one.token_ids, one.gen_mask, one.tool_calls, one.text, one.finish)
        assert torch.equal(b.pixel_values, one.pixel_values)
    assert batch[0].tool_calls[2]["result"] == tools.NO_MORE_TOOLS  # max_tool_calls=2: the third is refused
    # past the budget a call to a tool the loop does not know still says so (the format reward counts on it)
    (r,) = _run(m, tokenizer, [prompts[0]], registry=tools.load_tools("Crop"), max_tool_calls=1, max_new_tokens=120)
    assert [c["name"] for c in r.tool_calls[:2]] == ["Crop", "Identify"] and r.tool_calls[0]["ok"]
    assert r.tool_calls[1]["result"].startswith("Error: unknown tool 'Identify'"), r.tool_calls[1]


def test_token_budget_and_thinking_budget_span_rounds(trained, tokenizer):
    m, _, enc = trained
    prompts = [_prompt(tokenizer), _prompt(tokenizer, "<image>\nAnd here?", "images/syn_002.png")]
    plain = _run(m, tokenizer, prompts[:1], max_new_tokens=30)[0]
    assert plain.n_generated == 30 and plain.finish == "length" and sum(plain.gen_mask) == 30
    assert plain.token_ids == enc["input_ids"].tolist()[:len(plain.token_ids)]  # a prefix of the full replay
    first = len(tokenizer("<think>\nZoom. <tool_call>Crop [265, 90, 295, 120]</tool_call>")["input_ids"])
    budget = first + 4  # runs out in round 2, after the crop
    rows = _run(m, tokenizer, prompts, ["images/syn_000.png", "images/syn_002.png"], max_new_tokens=60,
                thinking_budget=budget)
    for k, r in enumerate(rows):
        (one,) = _run(m, tokenizer, [prompts[k]], [["images/syn_000.png", "images/syn_002.png"][k]],
                      max_new_tokens=60, thinking_budget=budget)
        assert (r.token_ids, r.gen_mask) == (one.token_ids, one.gen_mask)  # per row, batch or not
        gen = [t for t, g in zip(r.token_ids, r.gen_mask) if g]
        assert r.n_generated <= 60
        n, f = len(M.THINK_EARLY_STOP_IDS), list(M.THINK_EARLY_STOP_IDS)
        if M.THINK_END_ID in gen[:budget]:  # (row 1, not memorised, may close its thinking itself: no forcing)
            assert k == 1 and f not in [r.token_ids[j:j + n] for j in range(len(r.token_ids))]
            continue
        at = next(k for k in range(len(r.token_ids)) if r.token_ids[k:k + n] == f)  # forced after `budget` tokens
        assert sum(r.gen_mask[:at]) == budget and r.gen_mask[at:at + n] == [0] * n  # ...and not sampled
    assert rows[0].tool_calls[0]["name"] == "Crop"  # row 0's budget ran out in round 2, after its crop
    assert rows[0].thinking.startswith("Zoom.") and "Considering the limited time" in rows[0].thinking


def test_split_output():
    assert tools.split_output("<think>\na\n</think>\n\n<answer> b </answer>") == ("a", "b")
    assert tools.split_output("<think>\na\n</think>\n\nfree text") == ("a", "free text")
    assert tools.split_output("<think>\nunfinished <answer>x") == ("unfinished <answer>x", "")
    assert tools.split_output("no think at all") == ("", "no think at all")


def test_no_registry_is_plain_generation(trained, tokenizer):
    m, _, enc = trained
    (r,) = _run(m, tokenizer, [_prompt(tokenizer)], registry=None, max_new_tokens=40)
    # the model writes a call, but without a registry nothing runs and </tool_call> does not stop the row
    assert r.tool_calls == [] and r.crops == [] and r.text.count("</tool_call>") >= 2
    ref = m.generate(_prompt(tokenizer)["input_ids"], _prompt(tokenizer)["pixel_values"],
                     _prompt(tokenizer)["grid_thws"], max_new_tokens=40)[0].tolist()
    ref = ref[:next((i + 1 for i, t in enumerate(ref) if t in M.EOS_IDS), len(ref))]  # up to the end token
    assert r.token_ids[r.prompt_len:] == ref and r.n_generated == len(ref)


def test_infer_cli_single_and_resumable_batch(trained, tokenizer, tmp_path, capsys):
    m, _, _ = trained
    ckpt = tmp_path / "ckpt"
    m.save_pretrained(str(ckpt), source_dir=str(ROOT / "assets" / "tiny"))
    px = ["--min-pixels", "1024", "--max-pixels", "4096", "--crop-min-pixels", "1024", "--crop-max-pixels", "4096"]
    common = ["--model", str(ckpt), "--tools", "--think", "--greedy", "--identify", IDENTIFY_MAP,
              "--max-tool-calls", "4", "--max-new-tokens", "200", "--image-dir", str(DEMO), *px]
    assert infer.main([*common, "--image", IMAGE_KEY, "--prompt", QUESTION.split("\n")[1]]) == 0
    out = capsys.readouterr().out
    assert "[tool] Crop [265.0, 90.0, 295.0, 120.0] -> ok: <image>" in out and out.rstrip().endswith("[answer]\ngreen")
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    reqs = [SAMPLE, {"id": "p1", "image": IMAGE_KEY, "prompt": QUESTION.split("\n")[1]},
            {"id": "m2", "messages": [{"role": "user", "content": [
                {"type": "image", "image": str(DEMO / IMAGE_KEY)}, {"type": "text", "text": "What color?"}]}]}]
    q.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    batch = [*common, "--input", str(q), "--output", str(a), "--batch-size", "2"]
    assert infer.main(batch) == 0
    first = [json.loads(x) for x in a.read_text().splitlines()]
    assert [r["id"] for r in first] == ["t0", "p1", "m2"]
    assert first[0]["answer"] == "green" and first[0]["tool_calls"][1]["result"] == "blue square"
    assert first[1]["answer"] == "green"  # same prompt tokens, other request format
    a.write_text("".join(json.dumps(r) + "\n" for r in first[:1]) + '{"id": "p1", "answ')  # interrupted run
    assert infer.main(batch) == 0
    again = [json.loads(x) for x in a.read_text().splitlines()]
    untimed = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert untimed(again) == untimed(first) and all(r["seconds"] > 0 for r in again)
    assert "2 answered, 0 errors, 1 already" in capsys.readouterr().out


def test_peft_lora_adapter_is_merged(trained, tmp_path):
    """An adapter in lora.py's layout (peft around the whole model, ViT adapters and a full head copy included) is
    merged at load; with no model path the base recorded in the adapter is used."""
    from peft import LoraConfig, get_peft_model

    m, _, _ = trained
    ckpt, adapter = tmp_path / "ckpt", tmp_path / "lora"
    m.save_pretrained(str(ckpt), source_dir=str(ROOT / "assets" / "tiny"))
    peft_model = get_peft_model(M.Ovis25.from_pretrained(str(ckpt)).eval(), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=["visual_tokenizer.head"],
        target_modules=r"(llm\.model|visual_tokenizer\.vit\.vision_model\.encoder)\.layers\.\d+\.self_attn\.(q|v)_proj"))
    peft_model.peft_config["default"].base_model_name_or_path = str(ckpt)
    with torch.no_grad():
        head = peft_model.base_model.model.visual_tokenizer.head.modules_to_save["default"]
        head[0].weight.mul_(1.5)
    peft_model.save_pretrained(str(adapter))
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
    inp = {"input_ids": torch.cat([ids[:, :3], torch.tensor([[M.INDICATOR_IDS[0]] + [M.VISUAL_ATOM_ID] * 4 +
                                                             [M.INDICATOR_IDS[1]]]), ids[:, 3:]], 1),
           "pixel_values": torch.randn(16, 3 * 16 * 16), "grid_thws": torch.tensor([[1, 4, 4]])}
    with torch.no_grad():
        want = peft_model(**inp).logits
        plain = M.Ovis25.from_pretrained(str(ckpt))(**inp).logits
        eng = infer.load(None, adapter=str(adapter), device="cpu")
        got = eng.model(**inp).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter changes the model...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ...and load() merges exactly it
    assert type(eng.model).__name__ == "Ovis25" and eng.sampling["top_k"] == 20
    assert not any("lora" in k for k in eng.model.state_dict())


def test_sampling_is_seeded_and_masks_match(trained, tokenizer):
    m, _, _ = trained
    prompts = [_prompt(tokenizer), _prompt(tokenizer, "<image>\nAnd here?", "images/syn_002.png")]

    def sample():
        return _run(m, tokenizer, prompts, [IMAGE_KEY, "images/syn_002.png"], do_sample=True, temperature=1.5,
                    top_k=50, top_p=0.95, repetition_penalty=1.05, generator=torch.Generator().manual_seed(0),
                    max_new_tokens=80)

    a, b = sample(), sample()
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for r in a:
        assert len(r.token_ids) == len(r.gen_mask) and sum(r.gen_mask) == r.n_generated
        assert r.gen_mask[:r.prompt_len] == [0] * r.prompt_len and r.finish in ("eos", "length")


def test_one_name_per_budget_setting_in_every_stage_and_flag():
    """The pixel / frame budgets are spelled alike in sft / lora / grpo configs and, in kebab case, as infer.py flags
    (the old --min-pixels / --max-pixels stay as aliases); the length settings, training's, are no infer flags; a
    config class without a budget field is refused by name (never a silent default)."""
    import common
    import grpo
    import lora
    import sft

    for cls in (sft.Config, lora.Config, grpo.Config):
        assert set(data.IMAGE_BUDGETS) <= set(cls.__dataclass_fields__), cls
    assert set(data.RECORDED) - {"video_min_pixels", "video_max_pixels", "min_frames", "max_frames"} <= set(
        grpo.Config.__dataclass_fields__)
    flags = {o: a.dest for a in infer.arguments()._actions for o in a.option_strings}
    for name in data.RECORDED:
        assert flags["--" + name.replace("_", "-")] == name
    assert flags["--min-pixels"] == "single_image_min_pixels" and flags["--think"] == "enable_thinking"
    assert not {"--max-length", "--text-max-length", "--overlong"} & set(flags)

    class Partial:  # a stage config whose budget field was renamed
        single_image_min_pixels = 1

    with pytest.raises(common.ConfigError, match=r"Partial lacks the budget setting\(s\) \['single_image_max_pixels'"):
        data.Budgets.of(Partial(), data.IMAGE_BUDGETS)
