"""Your own tools, end to end, as a user would add them: a text tool (Count) and image tools (Flip, Turn) from
tests/my_tools.py, loaded by dotted path into every stage: encoded in training data, learned by sft.py, replayed by
infer.py on its own, executed in GRPO rollouts with the right masks; and infer.py --score on the result."""

import json
from collections import Counter

import pytest
import torch
from PIL import Image

import data
import data_check
import grpo
import infer
import model as M
import sft
import tools
from _util import DEMO, ROOT, cfg_for, metrics

USER = "Crop|Identify|tests.my_tools:Count|tests.my_tools:Flip|tests.my_tools:Turn"
IMG, BOX = "images/syn_000.png", "[265, 90, 295, 120]"
PX = dict(single_image_min_pixels=4096, single_image_max_pixels=20480, crop_min_pixels=4096, crop_max_pixels=8192)


pytestmark = pytest.mark.usefixtures("world_one")  # one process group for in-process engines (conftest)


def test_user_tools_are_encoded_like_crop(tokenizer, tmp_path, capsys):
    reg = tools.load_tools(USER)
    assert reg.names() == ["Crop", "Identify", "Count", "Flip", "Turn"]
    assert "- Count [x1, y1, x2, y2]: how many distinct colours" in reg.system_prompt()
    value = (f"<think>\nHow many? <tool_call>Count {BOX}</tool_call><tool_response>999</tool_response>\nFlip: "
             f"<tool_call>Flip {BOX}</tool_call><image>\nTurn: <tool_call>Turn</tool_call><image>\n</think>\n\n"
             "<answer>green</answer>")
    sample = {"id": "u", "image": IMG, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                         {"from": "gpt", "value": value}]}
    full = data.encode_sample(sample, tokenizer, DEMO, registry=reg, **PX)
    lite = data.encode_sample(sample, tokenizer, DEMO, registry=reg, with_pixels=False, **PX)  # the length pass
    assert torch.equal(full["input_ids"], lite["input_ids"]) and torch.equal(full["grid_thws"], lite["grid_thws"])
    assert full["tool_calls"] == Counter({"Count": 1, "Flip": 1, "Turn": 1})
    # a text tool never runs at load: the recorded "999" stays, unlearned; the calls themselves are learned
    ids, labels = full["input_ids"].tolist(), full["labels"].tolist()
    op, cl = tokenizer.convert_tokens_to_ids(["<tool_response>", "</tool_response>"])
    a, b = ids.index(op), ids.index(cl)
    assert tokenizer.decode(ids[a:b + 1]) == "<tool_response>999</tool_response>"
    assert all(x == M.IGNORE_ID for x in labels[a:b + 1]) and labels[a - 1] == ids[a - 1]  # `</tool_call>` learned
    # image results are the tools' own output, pixel for pixel (the original image first)
    img = Image.open(DEMO / IMG).convert("RGB")
    n0 = M.preprocess_image(img, 4096, 20480)[0].shape[0]
    want = [tools.tool_result_pixels(reg.execute(c, [img], [IMG]), 4096, 8192)[0] for c in (f"Flip {BOX}", "Turn")]
    assert torch.equal(full["pixel_values"][n0:], torch.cat(want))
    with pytest.raises(data.SampleError, match=r"tool call 1 \(Count\): must be followed directly by <tool_resp"):
        data.encode_sample({**sample, "conversations": [sample["conversations"][0], {
            "from": "gpt", "value": value.replace("<tool_response>999</tool_response>", "")}]}, tokenizer, DEMO,
            registry=reg, **PX)
    # python data.py check: fine with the run's tools, "unknown tool" without them
    (tmp_path / "d.json").write_text(json.dumps([sample]))
    check = ["--data", str(tmp_path / "d.json"), "--image_dir", str(DEMO)]
    assert data_check.check(check + ["--tools", USER]) == 0
    assert data_check.check(check) == 1 and "unknown tool 'Count'" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"tools: cannot import 'tests.my_tools:Nope' \(AttributeError"):
        tools.load_tools("Crop|tests.my_tools:Nope")
    with pytest.raises(ValueError, match="tools: 'collections:Counter' is not a built-in tool .* nor a tools.Tool sub"):
        tools.load_tools("collections:Counter")


def test_train_infer_score_and_rollout_with_user_tools(base, tokenizer, tmp_path):
    reg = tools.load_tools(USER)
    img = Image.open(DEMO / IMG).convert("RGB")
    n = reg.execute(f"Count {BOX}", [img], [IMG]).text  # what the tool answers live: the data records it
    system = {"from": "system", "value": reg.system_prompt()}  # what infer.py and grpo.py add to a bare prompt
    prompt = {"id": "u0", "image": IMG, "answer": "green", "bbox": [270, 95, 290, 115], "conversations": [
        system, {"from": "human", "value": "<image>\nWhat color is the small square?"}]}
    answer = (f"<think>\nCount. <tool_call>Count {BOX}</tool_call><tool_response>{n}</tool_response>\nFlip. "
              f"<tool_call>Flip {BOX}</tool_call><image>\n</think>\n\n<answer>green</answer>")
    sample = {**prompt, "conversations": prompt["conversations"] + [{"from": "gpt", "value": answer}]}
    (tmp_path / "one.json").write_text(json.dumps([sample]))
    out = tmp_path / "sft"
    sft.main(sft.Config(**cfg_for(base, str(tmp_path / "one.json"), out, tools=USER, lr=1e-2, schedule="constant",
                                  max_steps=70, max_tokens=2048, save_interval=1000,
                                  zero_config=str(ROOT / "zero_configs" / "zero0.json"))))
    # infer.py on its own: both calls run, the answer and the scores come out
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text(json.dumps(prompt) + "\n")
    args = ["--model", str(out / "final"), "--input", str(q), "--output", str(a), "--image-dir", str(DEMO),
            "--tools", USER, "--think", "--greedy", "--max-new-tokens", "200", "--min-pixels", "4096",
            "--max-pixels", "20480", "--crop-min-pixels", "4096", "--crop-max-pixels", "8192",
            "--score", "accuracy|format|iou|tool|tests.grpo_rewards.even_ids"]
    assert infer.main(args) == 0
    rec = json.loads(a.read_text())
    assert [(c["name"], c["ok"], c["result"]) for c in rec["tool_calls"]] == [("Count", True, n), ("Flip", True, None)]
    assert rec["answer"] == "green" and rec["scores"]["accuracy"] == rec["scores"]["format"] == 1.0
    assert rec["scores"]["iou"] == rec["scores"]["tool"] == 0.0  # no Crop in this trajectory
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    assert summary["accuracy"] == summary["format_rate"] == 1.0 and summary["tools"] == {"Count": 1, "Flip": 1}
    assert summary["tool_calls_per_question"] == 2 and summary["valid_crop_rate"] is None
    # token for token the training encoding; sampled tokens = learned tokens (tool results masked)
    session = infer.load(str(out / "final"), device="cpu")
    r = infer.chat_batch(session, [prompt], str(DEMO), enable_thinking=True, use_tools=USER, do_sample=False,
                         max_new_tokens=200, single_image_min_pixels=4096, single_image_max_pixels=20480,
                         crop_min_pixels=4096,
                         crop_max_pixels=8192)[0]
    enc = data.encode_sample(sample, tokenizer, DEMO, registry=reg, **PX)
    assert r.token_ids == enc["input_ids"].tolist()
    assert r.gen_mask == [int(x != M.IGNORE_ID) for x in enc["labels"].tolist()]
    # a GRPO rollout (grpo.py's own prompt and loop, sampling) runs both tools; only sampled tokens carry loss
    cfg = grpo.Config(model_path=str(out / "final"), data_path=str(q), image_dir=str(DEMO), tools=USER,
                      single_image_min_pixels=4096, single_image_max_pixels=20480, crop_min_pixels=4096,
                      crop_max_pixels=8192)
    inp, imgs, keys = grpo.prompt_inputs(prompt, cfg, tokenizer, reg)
    rolls = tools.run_tool_loop(session.model, tokenizer, [inp] * 2, images=[imgs] * 2, keys=[keys] * 2, registry=reg,
                                max_new_tokens=200,
                                crop_min_pixels=4096, crop_max_pixels=8192, do_sample=True, temperature=0.05,
                                generator=torch.Generator().manual_seed(0))
    for ro in rolls:
        assert [c["name"] for c in ro.tool_calls] == ["Count", "Flip"] and all(c["ok"] for c in ro.tool_calls)
        mb = tools.pack_rollouts([ro], "cpu")
        ids, lab = mb["input_ids"][0].tolist(), mb["labels"][0].tolist()
        op, cl = tokenizer.convert_tokens_to_ids(["<tool_response>", "</tool_response>"])
        a_ = ids.index(op, ro.prompt_len)  # (the system prompt mentions the markers too)
        b_ = ids.index(cl, a_)
        assert all(x == M.IGNORE_ID for x in lab[a_:b_ + 1])  # Count's answer: not the model's
        assert all(x == M.IGNORE_ID for i, x in zip(ids, lab) if i < 0)  # Flip's visual tokens neither
        assert all(x in (i, M.IGNORE_ID) for i, x in zip(ids, lab)) and lab[a_ - 1] == ids[a_ - 1]
    # and grpo.py itself, told the tools by config, rolls them out
    (tmp_path / "p.json").write_text(json.dumps([prompt] * 2))
    grpo.main(grpo.Config(**{**cfg.__dict__, "data_path": str(tmp_path / "p.json"), "output_dir": str(tmp_path / "g"),
                             "zero_config": str(ROOT / "zero_configs" / "zero0.json"), "prompts_per_rank": 1,
                             "num_generations": 2, "micro_batch_size": 2, "max_new_tokens": 120, "max_steps": 1,
                             "temperature": 0.05, "bf16": False, "gradient_checkpointing": False,
                             "max_empty_step_frac": 1.0}))  # (near-greedy: no reward varies, and that is not the point)
    assert metrics(tmp_path / "g")[0]["tool_calls_per_rollout"] == 2
