"""grpo.py: rewards on hand-made texts, advantages and loss against hand computation, masking of tool outputs through
the real forward, an easy-reward run that must learn, resume, and a 2-rank ZeRO-3 LoRA run with real tool rollouts."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import data
import grpo
import model as M
import scoring
import tools
from _util import DEMO, ROOT, check_adapter, check_export, launch, metrics

GOOD = ("<think>\nThe square is small, I will zoom in on it. <tool_call>Crop [270, 95, 290, 115]</tool_call><image>\n"
        "The crop shows a green square.\n</think>\n\n<answer>green</answer>")
SAMPLE = {"id": "s", "answer": "green", "bbox": [274, 99, 286, 111]}


pytestmark = pytest.mark.usefixtures("world_one")  # one process group for in-process engines (conftest)


def comp(text, model_text=None, calls=(), sample=SAMPLE, thinking=True, fmt="pixel", size=(320, 240)):
    """(rollout, sample) as a scorer sees them: the text with tool results, the model's own tokens, the calls."""
    r = tools.Rollout(text=text, tool_calls=list(calls), thinking_on=thinking, image_size=size, bbox_format=fmt,
                      model_text=text.replace("<image>", "") if model_text is None else model_text)
    r.thinking, r.answer = tools.split_output(text)
    return r, sample


def crop(box, ok=True):
    return {"name": "Crop", "args": box, "ok": ok, "result": "" if ok else "Error: zero area"}


def test_format_reward_and_adversarial_texts():
    f = scoring.score_format
    assert f(*comp(GOOD)) == 1.0
    identify = "<think>\nWho? <tool_call>Identify [1, 2, 30, 40]</tool_call><tool_response>Theo</tool_response>\n" \
               "</think>\n\n<answer>Theo</answer>"
    # the loop inserted that response: fine; the model writing one itself: 0
    assert f(*comp(identify, model_text=identify.replace("<tool_response>Theo</tool_response>", ""))) == 1.0
    assert f(*comp(identify, model_text=identify)) == 0.0
    assert f(*comp(GOOD.replace("</think>", ""))) == 0.0  # unclosed thinking
    assert f(*comp(GOOD.replace("<answer>green</answer>", "green"))) == 0.0  # no answer block
    assert f(*comp(GOOD + " more")) == 0.0  # text after the answer
    late = GOOD.replace("</think>\n\n<answer>", "</think><tool_call>Crop [1, 1, 9, 9]</tool_call><answer>")
    assert f(*comp(late)) == 0.0  # a call after the thinking
    assert f(*comp(GOOD.replace("Crop [270, 95, 290, 115]", "Crop [270, 95]"))) == 0.0  # unparseable call
    assert f(*comp(GOOD.replace("<tool_call>", ""))) == 0.0  # a </tool_call> without its start
    assert f(*comp("<answer>green</answer>", thinking=False)) == 1.0
    assert f(*comp("<think>\n</think><answer>green</answer>", thinking=False)) == 1.0


def test_accuracy_iou_and_tool_rewards():
    acc = scoring.score_accuracy
    assert acc(*comp(GOOD.replace(">green<", ">Green.<"))) == 1.0
    assert acc(*comp(GOOD.replace(">green<", ">the green<"))) == 1.0  # articles and punctuation do not count
    assert acc(*comp(GOOD.replace(">green<", ">It is green<"))) == 0.0
    assert acc(*comp("<think>x</think>\n\ngreen")) == 1.0  # no answer tags: the text after </think>
    assert acc(*comp(GOOD.replace(">green<", ">red<"), sample={**SAMPLE, "answer": ["red", "green"]})) == 1.0
    assert acc(*comp(GOOD, sample={"answer": None})) == 0.0
    num = {**SAMPLE, "answer": "3"}
    assert [acc(*comp(GOOD.replace(">green<", f">{a}<"), sample=num)) for a in ("3 squares", "3.0", "4", "3 or 4")] \
        == [1.0, 1.0, 0.0, 0.0]
    gt, iou = SAMPLE["bbox"], scoring.score_iou
    assert iou(*comp(GOOD, calls=[crop(gt)])) == 1.0
    assert iou(*comp(GOOD, calls=[crop(gt), crop([900, 900, 950, 950], ok=False)])) == 0.5  # outside: failed
    assert abs(iou(*comp(GOOD, calls=[crop([274, 99, 280, 111])])) - 0.5) < 1e-9  # half the box
    assert iou(*comp(GOOD)) == 0.0 and iou(*comp(GOOD, calls=[crop(gt)], sample={"answer": "x"})) == 0.0
    norm = {**SAMPLE, "bbox": [0.5, 0.5, 0.6, 0.6]}
    assert abs(iou(*comp(GOOD, calls=[crop([0.5, 0.5, 0.6, 0.6])], sample=norm, fmt="norm")) - 1.0) < 1e-9
    tool = scoring.score_tool
    assert tool(*comp(GOOD, calls=[crop(gt)])) == 1.0
    assert tool(*comp(GOOD)) == 0.0  # right without a crop
    assert tool(*comp(GOOD.replace(">green<", ">red<"), calls=[crop(gt)])) == 0.0  # a crop, wrong answer
    assert tool(*comp(GOOD, calls=[crop(gt, ok=False)])) == 0.0  # only a failed crop


def test_seed_rewards_follow_its_rules():
    tu = scoring.score_tool_usage
    assert tu(*comp("I see a person.")) == 0.0 and tu(*comp("It is green.")) == 0.5  # keyword rule
    assert tu(*comp(GOOD)) == pytest.approx(0.6)  # Crop inside the think block: 0.3 + 0.3
    ident = "<think>Who is it <tool_call>Identify [1, 2, 30, 40]</tool_call>{}</think><answer>Theo</answer>"
    assert tu(*comp(ident.format("<tool_response>Theo</tool_response>"))) == pytest.approx(1.0)
    assert tu(*comp(ident.format(""))) == pytest.approx(0.6)
    assert tu(*comp("<tool_call>Crop [-1, 2, 30, 40]</tool_call>")) == 0.0  # not the strict syntax; "crop" keyword
    bv = scoring.score_bbox_validity
    assert bv(*comp("[10, 10, 5, 20] and [1, 1, 2, 2]")) == 0.5 and bv(*comp("[ 1, 2, 3, 4]")) == 1.0
    assert bv(*comp("no boxes")) == 1.0
    rq = scoring.score_reasoning_quality
    long = ("<think>" + "word " * 11 + "<tool_call>Identify [1, 2, 3, 4]</tool_call><tool_response>Theo"
            "</tool_response> so this is clearly the person we want</think><answer>Theo</answer>")
    assert rq(*comp(long)) == pytest.approx(1.0)  # 0.3 + 0.3 + 0.2 + 0.2
    assert rq(*comp("<answer>x</answer>")) == pytest.approx(0.15)  # 0.3, halved under 20 words


def test_parse_rewards_custom_and_errors():
    fns = scoring.parse_scorers("format:0.5|tests.grpo_rewards.even_ids:2|accuracy")
    assert [(n, w) for n, w, _ in fns] == [("format", 0.5), ("tests.grpo_rewards.even_ids", 2.0), ("accuracy", 1.0)]
    assert fns[1][2](*comp("x", calls=[])) == 0.0
    with pytest.raises(ValueError, match="rewards: unknown scorer 'acuracy'"):
        scoring.parse_scorers("acuracy:1")
    with pytest.raises(ValueError, match=r"rewards: cannot import 'no_such_module.f' \(ModuleNotFoundError"):
        scoring.parse_scorers("no_such_module.f:1")
    with pytest.raises(ValueError, match="loss_type"):
        grpo.token_weights([1], "ppo", 1, 1, 1)


def test_advantages_weights_and_loss_by_hand():
    adv = grpo.group_advantages(torch.tensor([[1.0, 0, 0, 1], [2, 2, 2, 2]]), scale=True)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)) and adv[1].abs().max() == 0
    assert torch.allclose(grpo.group_advantages(torch.tensor([[1.0, 0, 0, 1]]), scale=False),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    assert grpo.token_weights([2, 4], "grpo", 2, 6, 8) == [0.25, 0.125]
    assert grpo.token_weights([2, 4], "bnpo", 2, 6, 8) == [1 / 6, 1 / 6]
    assert grpo.token_weights([2, 4], "dr_grpo", 2, 6, 8) == [1 / 16, 1 / 16]
    cfg = grpo.Config(epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
    logp = torch.full((3,), math.log(0.5), requires_grad=True)
    old = logp.detach() + torch.tensor([-0.5, 0.0, 0.5])  # ratios e^0.5 = 1.649, 1, e^-0.5 = 0.607
    a, w = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0.5, 0.25, 0.25])
    loss, st = grpo.policy_loss(logp, old, None, a, w, cfg)
    # token 1: clipped at 1.28 (A > 0); token 2: ratio 1; token 3: clipped at 0.8 (A < 0) -> min(-0.607, -0.8)
    assert loss.item() == pytest.approx(0.5 * -1.28 + 0.25 * -1 + 0.25 * 0.8)
    assert st["clipped"].tolist() == [True, False, True]
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -0.25, 0.0])  # clipped tokens carry no gradient
    cfg.beta = 0.1
    logp.grad = None
    ref = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.5)])
    loss, st = grpo.policy_loss(logp, old, ref, a, w, cfg)
    k3 = 0.5 + math.log(2) - 1  # e^d - d - 1 at d = log(0.25) - log(0.5)
    assert st["kl"].tolist() == pytest.approx([0.0, k3, 0.0])
    assert loss.item() == pytest.approx(-0.69 + 0.1 * k3 * 0.25)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -0.25 + 0.1 * 0.25 * (1 - 0.5), 0.0])


def test_rollouts_mask_tool_outputs_and_match_the_training_encoding(tool_ckpt, tokenizer):
    """Real rollouts with the Crop tool: the packed training row labels exactly the sampled tokens, the sequence is
    the SFT encoding of the same conversation, and the loss's gradient reaches only positions predicting them."""
    m = M.Ovis25.from_pretrained(tool_ckpt)
    cfg = grpo.Config(image_dir=str(DEMO), single_image_min_pixels=4096, single_image_max_pixels=8192,
                      crop_min_pixels=4096, crop_max_pixels=8192)
    sample = data.load_prompts([str(DEMO / "grpo.json")], str(DEMO), "pixel")[0]
    reg = tools.load_tools()
    inp, images, keys = grpo.prompt_inputs(sample, cfg, tokenizer, reg)
    with torch.no_grad():
        rolls = tools.run_tool_loop(m.eval(), tokenizer, [inp, inp], images=[images] * 2, keys=[keys] * 2, registry=reg,
                                    max_new_tokens=80, crop_min_pixels=4096, crop_max_pixels=8192)
    r = rolls[0]
    assert [c["name"] for c in r.tool_calls] == ["Crop"] and r.tool_calls[0]["ok"] and r.finish == "eos"
    mb = tools.pack_rollouts(rolls, "cpu")
    labels = mb["labels"][0]
    mask = torch.tensor([x for q in rolls for x in q.gen_mask], dtype=torch.bool)
    assert torch.equal(labels != M.IGNORE_ID, mask)
    n_crop = int(M.num_visual_tokens(r.grid_thws[-1]))
    assert n_crop > 0 and (torch.tensor(r.token_ids) == M.VISUAL_ATOM_ID).sum() > n_crop  # prompt image + crop
    # the same conversation through the SFT encoder: identical ids, and loss exactly on the sampled tokens
    conv = sample["conversations"] + [{"from": "gpt", "value": r.text}]
    enc = data.encode_sample({**sample, "conversations": conv}, tokenizer, str(DEMO), single_image_min_pixels=4096,
                             single_image_max_pixels=8192, crop_min_pixels=4096, crop_max_pixels=8192)
    assert enc["input_ids"].tolist() == r.token_ids
    assert (enc["labels"] != M.IGNORE_ID).tolist() == [bool(x) for x in r.gen_mask]
    assert torch.equal(enc["pixel_values"], r.pixel_values)
    # gradient of the GRPO loss reaches the last hidden state only where the next token was sampled
    held = {}
    hook = m.llm.model.register_forward_hook(lambda mod, i, out: held.update(h=out.last_hidden_state))
    m.train()
    logp = grpo.token_logps(m, mb, 1.0)
    held["h"].retain_grad()
    assert logp.numel() == int(mask.sum())
    (-logp.sum()).backward()
    hook.remove()
    reaches = held["h"].grad[0].abs().sum(-1) > 0  # (T,)
    assert torch.equal(reaches[:-1], mask[1:]) and not reaches[-1]


def even_cfg(base, out, **kw):
    return {"model_path": base, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO), "output_dir": str(out),
            "zero_config": str(ROOT / "zero_configs" / "zero0.json"), "prompts_per_rank": 2, "num_generations": 8,
            "micro_batch_size": 8, "max_new_tokens": 12, "single_image_min_pixels": 4096,
            "single_image_max_pixels": 8192, "top_k": 8,
            "bf16": False, "gradient_checkpointing": False, "lr": 1e-2, "enable_thinking": False,
            "rewards": "tests.grpo_rewards.even_ids:1", "save_interval": 1000, **kw}


def test_easy_reward_rises_and_resume_is_exact(base, tmp_path):
    """A random tiny model, a verifiable reward (share of even token ids), full fine-tuning with a frozen-copy KL
    reference: the mean reward climbs clearly within 10 steps. Then an interrupted run resumes exactly."""
    out = tmp_path / "even"
    grpo.main(grpo.Config(**even_cfg(base, out, max_steps=10, beta=0.01, num_iterations=2)))
    rec = metrics(out)
    r = [x["reward"] for x in rec]
    assert len(rec) == 10 and sum(r[-3:]) / 3 > sum(r[:2]) / 2 + 0.2, r
    assert all(x["kl"] >= 0 for x in rec) and rec[-1]["kl"] > 0 and any(x["clip_frac"] > 0 for x in rec)
    assert {"reward_tests.grpo_rewards.even_ids", "accuracy", "tool_calls_per_rollout", "valid_crop_rate",
            "response_len", "kl", "clip_frac", "rollout_s", "train_s", "rollout_tok_per_s"} <= set(rec[0])
    check_export(out / "final", base, "float32")  # read without our loader: config, files, key set, dtypes
    res = tmp_path / "res"
    c = even_cfg(base, res, max_steps=4, save_interval=2, keep_last=5)
    grpo.main(grpo.Config(**c))
    full = metrics(res)
    shutil.rmtree(res / "checkpoints" / "step0000004")
    (res / "checkpoints" / "latest").write_text("step0000002")
    grpo.main(grpo.Config(**{**c, "resume": "auto"}))
    again = metrics(res)  # the records after step 2 were dropped on resume, then written again
    assert [x["step"] for x in again] == [x["step"] for x in full] == [1, 2, 3, 4]
    for x, y in zip(full, again):
        assert x["step"] == y["step"] and x["reward"] == y["reward"] and abs(x["loss"] - y["loss"]) < 1e-6, (x, y)


def test_shared_prompt_rollouts_equal_per_completion_prompts(tool_ckpt, tokenizer):
    """The G completions of a prompt share its ViT pass and prefill (the KV cache copied): greedy and sampled rollouts
    (the same generator state) are those of the prompt given G times, tool calls, masks and pixels included."""
    m = M.Ovis25.from_pretrained(tool_ckpt).eval()
    cfg = grpo.Config(model_path=tool_ckpt, data_path="x", image_dir=str(DEMO), single_image_min_pixels=4096,
                      single_image_max_pixels=8192, crop_min_pixels=4096, crop_max_pixels=8192)
    reg = tools.load_tools()
    inputs = [grpo.prompt_inputs(s, cfg, tokenizer, reg) for s in json.loads((DEMO / "grpo.json").read_text())[:2]]
    G, crops = 3, 0
    for kw in (dict(do_sample=False), dict(do_sample=True, temperature=1.0)):
        runs = []
        for group, rep in ((1, G), (G, 1)):  # today's path: each prompt G times; shared: group=G
            prompts, images, keys = ([x[k] for x in inputs for _ in range(rep)] for k in range(3))
            runs.append(tools.run_tool_loop(m, tokenizer, prompts, images=images, keys=keys, registry=reg,
                                            max_new_tokens=60, crop_min_pixels=4096,
                                            crop_max_pixels=8192, group=group,
                                            generator=torch.Generator().manual_seed(3), **kw))
        for a, b in zip(*runs):
            assert a.token_ids == b.token_ids and a.gen_mask == b.gen_mask and a.tool_calls == b.tool_calls
            assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.grid_thws, b.grid_thws)
        crops += sum(len(r.crops) for r in runs[1])
        assert len(runs[1]) == 2 * G
    assert crops > 0  # the rollouts really ran tool rounds after the shared prefill


def test_heldout_eval_best_and_early_stopping(base, tmp_path, capsys):
    """eval_data_path: an eval at step 0 and every eval_interval steps, the training metrics on the held-out prompts,
    best/ kept by eval_metric; early stopping after `patience` evals without improvement."""
    (tmp_path / "eval.json").write_text(json.dumps(json.loads((DEMO / "grpo.json").read_text())[-3:]))
    out = tmp_path / "ev"
    c = even_cfg(base, out, max_steps=4, eval_data_path=str(tmp_path / "eval.json"), eval_interval=2,
                 eval_metric="reward_tests.grpo_rewards.even_ids", eval_num_generations=2)
    grpo.main(grpo.Config(**c))
    rec = metrics(out)
    evals = [r for r in rec if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and [r["step"] for r in rec if "loss" in r] == [1, 2, 3, 4]
    assert {"eval_accuracy", "eval_format_rate", "eval_tool_calls_per_rollout", "eval_valid_crop_rate",
            "eval_mean_crop_iou", "eval_response_len", "eval_reward_tests.grpo_rewards.even_ids"} <= set(evals[0])
    assert all(r["grad_norm"] > 0 for r in rec if "loss" in r)  # ZeRO-0 reports its gradient norm too
    check_export(out / "best", base, "float32")
    c = {**c, "output_dir": str(tmp_path / "es"), "eval_interval": 1, "early_stopping_patience": 2,
         "early_stopping_min_delta": 10.0, "max_steps": 6}
    grpo.main(grpo.Config(**c))
    assert "early stopping at step 2" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path / "es") if "loss" in r] == [1, 2]
    assert (tmp_path / "es" / "final" / "model.safetensors").exists()


def test_dynamic_sampling_refills_groups_without_signal(base, tmp_path, capsys):
    """DAPO: zero-variance groups are replaced by fresh prompts' groups; when the prompts run out, the step trains on
    what there is and the run says so."""
    out = tmp_path / "dapo"
    grpo.main(grpo.Config(**even_cfg(base, out, max_steps=3, dynamic_sampling=True, max_refill_rounds=4,
                                     rewards="tests.grpo_rewards.half_flat:1", num_generations=4,
                                     micro_batch_size=4)))
    rec = metrics(out)
    assert sum(r["refill_rounds"] for r in rec) > 0 and all(r["kept_frac"] == 1.0 for r in rec)
    assert all(r["prompts_drawn"] == 2 * (1 + r["refill_rounds"]) for r in rec)
    few = [{**p, "id": f"p{i}"} for i, p in zip((0, 2, 4, 1), json.loads((DEMO / "grpo.json").read_text()))]
    (tmp_path / "few.json").write_text(json.dumps(few))  # 3 of 4 prompts without signal
    c = even_cfg(base, tmp_path / "few", data_path=str(tmp_path / "few.json"), epochs=1, dynamic_sampling=True,
                 rewards="tests.grpo_rewards.half_flat:1", num_generations=4, micro_batch_size=4)
    grpo.main(grpo.Config(**c))
    said = capsys.readouterr().out
    assert "step 1: the prompts ran out while refilling: training on what there is" in said
    assert "the prompts ran out after 2 draws (refills used them up): stopping at step 1" in said
    rec = metrics(tmp_path / "few")
    assert len(rec) == 1 and rec[0]["kept_frac"] < 1 and (tmp_path / "few" / "final" / "model.safetensors").exists()


def test_in_line_with_sft_offload_module_lrs_and_zero_config_checks(base, tmp_path):
    """ZeRO-3 with parameter and optimizer offload (one rank; the zero config opts out of DeepSpeed's CPU Adam, whose
    build the test suite never compiles), per-module lrs, Adam betas; an optimizer block in a zero config is an
    error, as in sft.py."""
    z = json.loads((ROOT / "zero_configs" / "zero3_offload.json").read_text())
    (tmp_path / "offload.json").write_text(json.dumps({**z, "zero_force_ds_cpu_optimizer": False}))
    out = tmp_path / "off"
    grpo.main(grpo.Config(**even_cfg(base, out, max_steps=2, zero_config=str(tmp_path / "offload.json"), bf16=False,
                                     train_modules="llm:1e-2|vte:0", adam_betas=[0.9, 0.95])))
    rec = metrics(out)
    assert len(rec) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rec)
    before, after = (load_file(f"{d}/model.safetensors") for d in (base, out / "final"))
    assert torch.equal(before["vte.weight"], after["vte.weight"])  # lr 0
    assert not torch.equal(before["llm.model.norm.weight"], after["llm.model.norm.weight"])
    m = M.Ovis25.from_pretrained(base)
    cfg = grpo.Config(train_modules="llm:1e-6|visual_tokenizer.vit.last_block:5e-6")
    groups = common.param_groups(m, grpo.trainable(cfg, m.config), cfg.weight_decay)
    assert {g["lr"] for g in groups} == {1e-6, 5e-6} and not m.vte.weight.requires_grad
    (tmp_path / "bad.json").write_text(json.dumps({**z, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="remove 'optimizer'; grpo.py builds the optimizer"):
        grpo.main(grpo.Config(**even_cfg(base, tmp_path / "bad", zero_config=str(tmp_path / "bad.json"))))
    with pytest.raises(ValueError, match="eval_metric: 'acc'"):
        grpo.main(grpo.Config(**even_cfg(base, tmp_path / "bad", eval_metric="acc")))


def test_bad_samples_are_named(tmp_path):
    good = json.loads((DEMO / "grpo.json").read_text())[:2]
    for field, bad in (("bbox", {"bbox": [10, 10, 5, 20]}), ("image", {"image": "images/nope.png"}),
                       ("answer", {"answer": {"x": 1}}), ("conversations", {"conversations": []})):
        p = tmp_path / f"{field}.json"
        p.write_text(json.dumps([good[0], {**good[1], **bad}]))
        with pytest.raises(data.SampleError, match=rf"{field}.json:1 id=grpo_001 field={field}"):
            data.load_prompts([str(p)], str(DEMO), "pixel")
    with pytest.raises(data.SampleError, match="field=bbox"):
        data.load_prompts([str(DEMO / "grpo.json")], str(DEMO), "norm")  # pixel boxes read as normalised


def test_two_ranks_zero3_lora_tool_rollouts(tool_ckpt, tmp_path):
    """torchrun, 2 ranks, ZeRO-3, LoRA with the adapters-disabled reference and 2 updates per rollout batch: the
    rollouts really call Crop (crop results inside the sequences), every metric is finite, the adapter is saved."""
    out = tmp_path / "g2"
    c = {"model_path": tool_ckpt, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO),
         "output_dir": str(out), "zero_config": str(ROOT / "zero_configs" / "zero3.json"), "lora": True,
         "lora_r": 4, "lr": 1e-3, "beta": 0.05, "num_iterations": 2, "prompts_per_rank": 1, "num_generations": 4,
         "micro_batch_size": 2, "max_new_tokens": 60, "max_steps": 2, "single_image_min_pixels": 4096,
         "single_image_max_pixels": 8192,
         "crop_min_pixels": 4096, "crop_max_pixels": 8192, "bf16": False, "gradient_checkpointing": True,
         "dynamic_sampling": True, "max_refill_rounds": 2, "eval_data_path": str(tmp_path / "eval.json"),
         "eval_interval": 2}
    (tmp_path / "eval.json").write_text(json.dumps(json.loads((DEMO / "grpo.json").read_text())[:3]))  # 2 + 1
    stdout = launch("torchrun", c, tmp_path, script="grpo.py")
    assert "reference adapters disabled" in stdout
    rec = [x for x in metrics(out) if "loss" in x]
    assert len(rec) == 2 and all(math.isfinite(v) for x in rec for v in x.values() if v is not None)
    assert sum(x["tool_calls_per_rollout"] for x in rec) > 0 and max(x["valid_crop_rate"] or 0 for x in rec) > 0
    assert [x["step"] for x in metrics(out) if "eval_reward" in x] == [0, 2]  # 3 eval prompts over 2 ranks
    assert rec[-1]["kl"] > 0
    check_adapter(out / "final", json.loads((Path(tool_ckpt) / "config.json").read_text()))
    acfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == os.path.abspath(tool_ckpt) and acfg["revision"] is None


def test_shipped_grpo_configs_parse():
    for f in sorted((ROOT / "configs").glob("*grpo*.json")):
        c = common.load_config(grpo.Config, ["--config", str(f)])
        assert (ROOT / c.zero_config).exists(), f
        assert [n for n, _, _ in scoring.parse_scorers(c.rewards)] == [p.split(":")[0] for p in c.rewards.split("|")], f


def test_a_crop_too_thin_to_show_is_an_error_result(tool_ckpt, tokenizer):
    """A crop the pixel budget cannot represent (smart_resize has no valid size) must not crash a rollout: the
    model reads an error response instead, and the call is logged as failed."""
    class ThinCrop(tools.Tool):
        name, description = "Crop", "always a 316x32 strip"

        def run(self, args, images, keys):
            return tools.ToolResult(name="Crop", image=Image.new("RGB", (316, 32)))

    m = M.Ovis25.from_pretrained(tool_ckpt).eval()
    cfg = grpo.Config(image_dir=str(DEMO), single_image_min_pixels=4096, single_image_max_pixels=8192)
    sample = data.load_prompts([str(DEMO / "grpo.json")], str(DEMO), "pixel")[0]
    inp, images, keys = grpo.prompt_inputs(sample, cfg, tokenizer, tools.load_tools())
    with torch.no_grad():
        r = tools.run_tool_loop(m, tokenizer, [inp], images=[images], keys=[keys],
                                registry=tools.Registry([ThinCrop()]),
                                max_new_tokens=40, crop_min_pixels=4096, crop_max_pixels=8192)[0]
    assert r.tool_calls and not r.tool_calls[0]["ok"] and "316x32 crop is too thin" in r.tool_calls[0]["result"]
    assert "<tool_response>Error: the 316x32 crop is too thin" in r.text and r.crops == []


def test_rollout_pages_tool_health_and_the_collapse_guard(tool_ckpt, tmp_path, capsys):
    """Rollout pages every log_rollouts_interval steps: the rows re-read are the rollouts that trained (every one of
    the step: rewards = the scorers' on the logged trajectory, advantages = the group's, means = the step's metrics),
    and headless Chromium shows the page with the gold box drawn where it belongs; tool-use health in every step line
    and metrics.jsonl; the guard stays quiet on a healthy run; a reward that pays for not calling drives the tool rate
    down and the guard warns every such step (warn) or stops the run (stop), naming the last good checkpoint."""
    from test_report import GOLD, near, on_screen, screenshot

    import report

    base_cfg = {"model_path": tool_ckpt, "data_path": str(DEMO / "grpo.json"), "image_dir": str(DEMO),
                "zero_config": str(ROOT / "zero_configs" / "zero0.json"), "prompts_per_rank": 2,
                "num_generations": 4, "micro_batch_size": 8, "max_new_tokens": 60, "single_image_min_pixels": 4096,
                "single_image_max_pixels": 8192, "crop_min_pixels": 4096, "crop_max_pixels": 8192, "bf16": False,
                "gradient_checkpointing": False, "lr": 3e-3, "temperature": 1.0, "save_interval": 1,
                "log_rollouts_interval": 1, "log_rollouts_count": 8, "max_empty_step_frac": 1.0}
    out = tmp_path / "pages"
    grpo.main(grpo.Config(**base_cfg, output_dir=str(out), max_steps=2, rewards="format:0.5|iou:1",
                          min_tool_rate=0.25, tool_collapse_patience=1, on_tool_collapse="stop"))  # (quiet: done)
    rec = metrics(out)
    health = ("tool_rate", "answer_rate", "tool_calls_per_rollout", "valid_crop_rate", "response_len")
    assert all(set(health) <= set(r) for r in rec) and rec[0]["tool_rate"] > 0.5 and (out / "final").exists()
    said = capsys.readouterr().out
    lines = [x for x in said.splitlines() if x.startswith("step ")]
    assert len(lines) == 2 and all(f"| {k} " in x for x in lines for k in health) and "WARNING" not in said
    prompts = {p["id"]: p for p in data.load_prompts([str(DEMO / "grpo.json")], str(DEMO), "pixel")}
    for step, m in enumerate(rec, 1):
        rows = report.read_rows(out / "rollouts" / f"step_{step}.jsonl")
        assert len(rows) == 8 and len({x["id"] for x in rows}) == 2  # every rollout of the step: 2 prompts x 4
        for row in rows:  # the logged rewards are the scorers' on the logged trajectory
            r = tools.Rollout(text=row["text"], tool_calls=row["tool_calls"], image_size=tuple(row["image_size"]),
                              bbox_format=row["bbox_format"], thinking_on=True, n_generated=row["length"],
                              model_text=row["text"].replace("<image>", ""))
            r.thinking, r.answer = tools.split_output(r.text)
            assert r.answer == row["answer"] and row["gold_bbox"] == prompts[row["id"]]["bbox"]
            assert row["rewards"]["iou"] == pytest.approx(scoring.score_iou(r, prompts[row["id"]]))
            assert row["reward"] == pytest.approx(0.5 * row["rewards"]["format"] + row["rewards"]["iou"])
            assert len(row["crops"]) == sum(c["ok"] for c in row["tool_calls"] if c["name"] == "Crop")
        for pid in {x["id"] for x in rows}:  # the advantages are the group's, as the loss used them
            group = [x for x in rows if x["id"] == pid]
            want = grpo.group_advantages(torch.tensor([[x["reward"] for x in group]]), True)[0]
            assert [x["advantage"] for x in group] == pytest.approx(want.tolist(), abs=1e-5)
        n = len(rows)  # the step's metrics are means over the same rollouts
        assert m["reward"] == pytest.approx(sum(x["reward"] for x in rows) / n)
        assert m["tool_calls_per_rollout"] == pytest.approx(sum(len(x["tool_calls"]) for x in rows) / n)
        assert m["response_len"] == pytest.approx(sum(x["length"] for x in rows) / n)
    first = report.read_rows(out / "rollouts" / "step_2.jsonl")[0]  # the page: newest step first, its first row
    shot = screenshot(out / "rollouts" / "index.html")
    x1, y1, x2, y2 = first["gold_bbox"]
    for x, y in (((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2), (x2, (y1 + y2) / 2)):
        assert near(shot, on_screen(x, y, first["image_size"]), GOLD), (first["gold_bbox"], x, y)
    collapse = {**base_cfg, "rewards": "tests.grpo_rewards.no_tools:1", "lr": 2e-2, "min_tool_rate": 0.5,
                "tool_collapse_patience": 2, "max_steps": 8, "log_rollouts_interval": 0}
    grpo.main(grpo.Config(**collapse, output_dir=str(tmp_path / "warn")))  # warn (the default): loud, and done
    low = [r["tool_rate"] < 0.5 for r in metrics(tmp_path / "warn")]
    warned = [x for x in capsys.readouterr().out.splitlines() if x.startswith("WARNING step")]
    streaks = [k for k in range(1, len(low)) if low[k] and low[k - 1]]  # steps ending 2 low steps in a row
    assert streaks and len(warned) == len(streaks) and "tool use collapsed" in warned[0]
    assert (tmp_path / "warn" / "final").exists()
    with pytest.raises(common.RunError, match=r"step \d+: tool use collapsed: \d+% of the rollouts call a tool "
                                            r"\(min_tool_rate 0\.5\) for 2 steps in a row; see .*rollouts\. Stopped "
                                            r"without writing final/\. Last good checkpoint: .*step\d{7}"):
        grpo.main(grpo.Config(**collapse, output_dir=str(tmp_path / "stop"), on_tool_collapse="stop"))
    assert not (tmp_path / "stop" / "final").exists() and metrics(tmp_path / "stop")[-1]["tool_rate"] < 0.5


def test_trackers_get_the_rollouts_with_their_boxes(tool_ckpt, tmp_path, monkeypatch):
    """tensorboard and wandb (offline) on: the step scalars (tool use health among them) and a few rollouts per
    interval as images with the predicted and gold boxes drawn, read back with tensorboard's own EventAccumulator and
    from the files wandb wrote (its run log's history, its table JSON, its PNGs)."""
    if not os.environ.get("CI"):
        pytest.importorskip("tensorboard")
        pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import report

    for k in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):  # everything wandb writes stays under tmp_path
        monkeypatch.setenv(f"WANDB_{k}", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "tb"
    grpo.main(grpo.Config(model_path=tool_ckpt, data_path=str(DEMO / "grpo.json"), image_dir=str(DEMO),
                          output_dir=str(out), zero_config=str(ROOT / "zero_configs" / "zero0.json"),
                          prompts_per_rank=1, num_generations=2, micro_batch_size=2, max_new_tokens=60,
                          single_image_min_pixels=4096, single_image_max_pixels=8192, crop_min_pixels=4096,
                          crop_max_pixels=8192, bf16=False, gradient_checkpointing=False, max_steps=1,
                          rewards="format:0.5|iou:1", tensorboard=True, wandb_project="ovis-tune-test",
                          log_rollouts_interval=1, log_rollouts_count=2, max_empty_step_frac=1.0))
    ev = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"grpo/tool_rate", "grpo/reward", "grpo/mean_crop_iou"} <= set(ev.Tags()["scalars"])
    images = ev.Images("rollouts_train/0")
    assert len(images) == 1 and images[0].step == 1
    import io as _io

    gold = tuple(int(report.GOLD[k:k + 2], 16) for k in (1, 3, 5))
    rows = report.read_rows(out / "rollouts" / "step_1.jsonl")

    def gold_box_drawn(image, row):  # the prompt image's size, and the gold colour on the gold box's left edge
        x1, y1, x2, y2 = (round(v) for v in row["gold_bbox"])
        return image.size == tuple(row["image_size"]) and image.convert("RGB").getpixel((x1, (y1 + y2) // 2)) == gold

    assert gold_box_drawn(Image.open(_io.BytesIO(images[0].encoded_image_string)), rows[0])

    # wandb, offline: its run log (read with wandb's own Record protobuf) has the step's scalars and the rollouts
    # table, and the table's artifact holds the table JSON and the PNGs it names, boxes drawn
    (log,) = (tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(log))
    step1 = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
             if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert step1["_step"] == 1 and step1["tool_rate"] == metrics(out)[0]["tool_rate"]
    assert step1["rollouts_train/_type"] == "table-file" and step1["rollouts_train/nrows"] == 2
    (art,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
              and r.artifact.name.endswith("-rollouts_train")]
    files = {e.path: e.local_path for e in art.manifest.contents}
    table = json.loads(Path(files["rollouts_train.table.json"]).read_text())
    assert table["columns"] == ["rollout", "image", "text"] and len(table["data"]) == len(rows) == 2
    for (cap, cell, text), row in zip(table["data"], rows):
        assert cap.startswith(row["id"] + ":") and text == row["text"] and cell["_type"] == "image-file"
        assert gold_box_drawn(Image.open(files[cell["path"]]), row)


def _wandb_records(path):
    """The records of a wandb run log (`run-*.wandb`): a leveldb-style log (a 7-byte file header, then 32 KiB blocks
    of chunks, each with a 7-byte header: crc32, length, kind 1 full / 2 first / 3 middle / 4 last) of wandb's own
    protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record

    blob = Path(path).read_bytes()
    assert blob[:4] == b":W&B", f"{path} is not a wandb run log"
    pos, chunks = 7, b""
    while pos + 7 <= len(blob):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        size = int.from_bytes(blob[pos + 4:pos + 6], "little")
        kind = blob[pos + 6]
        chunks += blob[pos + 7:pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record
