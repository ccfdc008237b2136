"""GRPO for Ovis2.5 tool use: real multi-turn Crop/Identify rollouts, verifiable rewards, tool outputs masked.

Launch:
    deepspeed --num_gpus 8 grpo.py --config configs/grpo_9b.json
    torchrun --nproc_per_node 2 grpo.py --config configs/demo_grpo.json --lora=true
    python grpo.py --config configs/demo_grpo.json          # tiny model, CPU; after the SFT demo (README)

Algorithm choices (one optimizer step per rollout batch, repeated num_iterations times):
- Rollouts: num_generations completions per prompt through tools.run_tool_loop (the inference loop): each call runs
  on the sample's own image, its result (Crop: visual tokens; else a <tool_response>) is appended as training
  renders it. Only sampled tokens carry loss; prompt, tool outputs and forced thinking-budget text are masked.
  ZeRO-3: the weights are gathered and the partitioning hooks lifted for the rollout (the cost: every rank holds the
  full bf16 weights meanwhile, 18 GB for the 9B), so ranks decoding different lengths never wait on each other.
- Rewards: weighted named components (format, accuracy, iou, tool, and the seed's tool_usage, bbox_validity,
  reasoning_quality: tools.py's scorers, shared with infer.py --score) and your own fn(rollout, sample) -> float by
  dotted path; each logged separately.
- Advantages per group of num_generations: r - mean, divided by std + 1e-4 when scale_rewards (Dr. GRPO: false).
  dynamic_sampling drops groups whose rewards are all equal (no signal) from the loss and its normaliser.
- Loss per generated token: -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) + beta k3, with
  rho = pi / pi_old (pi_old: the rollout policy, scored once before the updates when num_iterations > 1) and
  k3 = exp(ref - logp) - (ref - logp) - 1 to the start model (LoRA: adapters disabled, no copy; full: a frozen
  copy; beta 0: none). loss_type: grpo = mean per sequence, then over sequences; bnpo = sum / tokens (DAPO);
  dr_grpo = sum / (sequences x max_new_tokens); over the global batch. Log-probs at the sampling temperature.
- Start: an SFT result (model_path), or a base + a lora.py `adapter` merged at load; lora=true trains fresh
  adapters on top, else train_modules as in sft.py. Checkpoints and resume as sft.py.
"""

import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from PIL import Image

import data
import model as ovis
import tools


@dataclass
class Config:
    # --- model and data
    model_path: str = ""  # checkpoint to start from (an SFT result; a dir or a Hub id), or the base of `adapter`
    adapter: str = ""  # optional lora.py adapter dir, merged into model_path (default: its recorded base) (ZeRO 0-2)
    data_path: str = ""  # samples: image, conversations up to the question (or "question"), answer, bbox
    image_dir: str = "."  # image paths in the samples are relative to this
    tools: str = "Crop|Identify"  # the tools rollouts run: built-in names or module:Class (tools.load_tools)
    identify_map: str = ""  # Identify backend: JSON {image path: [{"bbox": [...], "name": ...}]}; "" = none
    output_dir: str = "out/grpo"  # checkpoints/, final/, metrics.jsonl
    zero_config: str = "zero_configs/zero2.json"  # engine policy
    # --- what trains
    lora: bool = False  # train LoRA adapters on the LLM (reference = adapters disabled) instead of train_modules
    lora_r: int = 16  # adapter rank
    lora_alpha: float = 32  # adapter scale alpha / r
    train_modules: str = "llm"  # full mode: "|"-separated names as sft.py's (all, llm, ..., vte)
    # --- rollouts
    prompts_per_rank: int = 2  # prompts per rank per step; the global batch is prompts_per_rank x world prompts
    num_generations: int = 8  # completions per prompt (the group)
    micro_batch_size: int = 4  # completions per training forward (packed into one row)
    max_new_tokens: int = 1024  # model tokens per completion, over all tool rounds
    max_tool_calls: int = 4  # calls executed per completion; later ones are answered with an error
    enable_thinking: bool = True  # prompts open a thinking turn
    thinking_budget: int = 0  # force the end of thinking after this many tokens; 0 = no budget
    temperature: float = 1.0  # sampling (and the log-probs' temperature)
    top_p: float = 1.0
    top_k: int = 0
    min_pixels: int = data.Budgets.single_image_min_pixels  # pixel budget of the prompt images (data.Budgets)
    max_pixels: int = data.Budgets.single_image_max_pixels
    crop_min_pixels: int = data.Budgets.crop_min_pixels  # pixel budget of Crop results
    crop_max_pixels: int = data.Budgets.crop_max_pixels
    bbox_format: Literal["pixel", "norm", "norm1000"] = "pixel"  # Crop boxes and the data's bbox
    # --- rewards and policy update
    rewards: str = "format:0.5|accuracy:1|iou:0.5|tool:0.5"  # tools.py scorers name:weight|...; dotted path = yours
    scale_rewards: bool = True  # divide advantages by the group std
    dynamic_sampling: bool = False  # drop zero-variance groups from the loss
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "bnpo"  # normaliser of the token losses
    epsilon_low: float = 0.2  # ratio clip below 1
    epsilon_high: float = 0.28  # ratio clip above 1 (clip-higher)
    num_iterations: int = 1  # optimizer steps per rollout batch (PPO epochs)
    beta: float = 0.0  # KL (k3) weight to the reference; 0 = no reference forward
    lr: float = 1e-6  # peak learning rate (adapters: use ~1e-5)
    warmup_ratio: float = 0.0  # linear warmup over this fraction of the updates, then a constant lr
    weight_decay: float = 0.0
    epochs: int = 1  # passes over the prompts (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps on new rollouts; 0 = from epochs
    bf16: bool = True
    gradient_checkpointing: bool = True
    attn_implementation: str = ""  # "" = flash_attention_2 if installed else sdpa
    seed: int = 42
    # --- saving, logging
    save_interval: int = 50  # steps between resumable checkpoints (and a deployable final/ at the end)
    keep_last: int = 2
    resume: str = ""  # "" | "auto" | a checkpoint dir
    dist_timeout_s: int = 1800
    max_skipped_steps: int = 3  # fp16: more overflow-skipped steps in a row stop the run

    def __post_init__(self):
        data.check_choices(self)  # Literal fields: a typo is an error


# ----------------------------------------------------------------------------------------------------------------
# advantages and the loss (pure functions of tensors: tests check them against hand computation)


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages, normalised within each group."""
    adv = rewards - rewards.mean(1, keepdim=True)
    return adv / (rewards.std(1, keepdim=True) + 1e-4) if scale else adv


def token_weights(lengths: list[int], loss_type: str, n_seq: float, n_tok: float, max_new_tokens: int) -> list:
    """Per-sequence weight of each of its tokens, so that sum(weight * token loss) is the loss_type's mean over the
    global batch (n_seq sequences, n_tok generated tokens, all ranks)."""
    if loss_type == "grpo":
        return [1.0 / (max(n, 1) * n_seq) for n in lengths]
    if loss_type == "bnpo":
        return [1.0 / n_tok for _ in lengths]
    if loss_type == "dr_grpo":
        return [1.0 / (n_seq * max_new_tokens) for _ in lengths]
    raise ValueError(f"loss_type must be grpo, bnpo or dr_grpo, got {loss_type!r}")


def policy_loss(logp, old_logp, ref_logp, adv, weight, cfg: Config) -> tuple[torch.Tensor, dict]:
    """(n,) per generated token -> (sum of weight * token loss, stats): clip-higher surrogate + beta k3."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    stats = {"clipped": ((ratio < 1 - cfg.epsilon_low) & (adv < 0) | (ratio > 1 + cfg.epsilon_high) & (adv > 0))}
    if cfg.beta > 0:  # k3 is unbounded where the policy drops a reference-likely token: capped at 10 (verl)
        d = ref_logp - logp
        stats["kl"] = torch.clamp(torch.exp(d) - d - 1, max=10.0)
        loss = loss + cfg.beta * stats["kl"]
    return (loss * weight).sum(), stats


# ----------------------------------------------------------------------------------------------------------------
# data, model, checkpoints


def load_prompts(paths: list[str], image_dir: str, bbox_format: str) -> list[dict]:
    """Samples with an image and a question; `answer` (str, number or list) and `bbox` ([x1, y1, x2, y2] in
    bbox_format) optional. A bad one raises data.SampleError naming the file, sample and field."""
    out = []
    for path in paths:
        for s in data.load_samples(path):
            err = lambda field, why, s=s: data.SampleError(s["_file"], s["_index"], s.get("id"), field, why)
            s.setdefault("conversations", [{"from": "human", "value": s["question"]}] if "question" in s else None)
            if not isinstance(s.get("conversations"), list) or not any(
                    isinstance(t, dict) and t.get("from") in ("human", "user") for t in s["conversations"]):
                raise err("conversations", "needs a human turn with the question (or a `question` field)")
            imgs = [s["image"]] if isinstance(s.get("image"), str) else s.get("image")
            if not imgs or not all(isinstance(i, str) and os.path.isfile(os.path.join(image_dir, i)) for i in imgs):
                raise err("image", f"missing or not found under {image_dir!r}: {s.get('image')!r}")
            b = s.get("bbox", [0, 0, 1, 1])
            ok = isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
            if not ok or not (0 <= b[0] < b[2] <= {"norm": 1, "norm1000": 1000}.get(bbox_format, 1e9) and
                              0 <= b[1] < b[3] <= {"norm": 1, "norm1000": 1000}.get(bbox_format, 1e9)):
                raise err("bbox", f"{b!r} is not [x1, y1, x2, y2], x1 < x2, y1 < y2, within the {bbox_format} range")
            if "answer" in s and not isinstance(s["answer"], (str, int, float, list)):
                raise err("answer", "must be a string, a number or a list of them")
            out.append(s)
    if not out:
        raise ValueError(f"no samples in {paths}")
    return out


def prompt_inputs(s: dict, cfg: Config, tokenizer, registry) -> tuple[dict, list, list]:
    """A sample -> (data.build_inputs dict, its opened images, their keys); the tool system prompt is added when
    the sample has no system turn."""
    msgs = data.prompt_messages(s, cfg.image_dir)
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": [{"type": "text", "text": registry.system_prompt()}]}] + msgs
    keys = [s["image"]] if isinstance(s["image"], str) else list(s["image"])
    images = [Image.open(os.path.join(cfg.image_dir, k)).convert("RGB") for k in keys]
    return data.build_inputs(msgs, tokenizer, enable_thinking=cfg.enable_thinking, min_pixels=cfg.min_pixels,
                             max_pixels=cfg.max_pixels), images, keys


def lora_config(cfg: Config):
    """All seven LLM projections, matched by full name (never the ViT's q/k/v); no dropout, so the rollout policy
    and the trained one are the same function."""
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none", target_modules=r"llm\."
                      r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")


def load_model(cfg: Config, path: str, ds_config: dict, rank: int) -> ovis.Ovis25:
    """As sft.py: partitioned build + fill from rank 0 under ZeRO-3, else a plain load; `adapter` merged in."""
    with open(os.path.join(path, "config.json")) as f:
        mcfg = ovis.OvisConfig.from_dict(json.load(f))
    attn = cfg.attn_implementation or None
    if ds_config["zero_optimization"].get("stage", 0) == 3:
        if cfg.adapter:
            raise ValueError("adapter: merge it first under ZeRO-3 (python merge_lora.py), then set model_path")
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            m = ovis.Ovis25(mcfg, attn)

        def copy(p, t):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(t)
        ovis.load_weights(m, path, copy)
    else:
        m = ovis.Ovis25.from_pretrained(path, attn_implementation=attn)
        if cfg.adapter:
            m = ovis.load_adapter(m, cfg.adapter).merge_and_unload()
    m.source_dir = os.path.abspath(path)  # exports copy its config.json keys, tokenizer and code files
    return m


def param_groups(model, cfg: Config) -> list[dict]:
    """LoRA: the adapters. Full: the parameters under the train_modules names; the rest frozen. No weight decay on
    norms and biases."""
    mods = [] if cfg.lora else [ovis.module_prefix(model.config, m) for m, _ in ovis.parse_modules(cfg.train_modules,
                                                                                                   cfg.lr)]
    groups: dict = {}
    for name, p in model.named_parameters():
        on = "lora_" in name if cfg.lora else any(m == "" or name.startswith(m + ".") for m in mods)
        p.requires_grad_(on)
        if on:
            groups.setdefault(0.0 if p.ndim < 2 else cfg.weight_decay, []).append(p)
    return [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]


def export(engine, model, cfg: Config, out_dir: str, rank: int):
    """LoRA: the adapter (peft layout, base recorded); full: the official layout. A collective under ZeRO-3."""
    z3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad], enabled=z3 and cfg.lora):
        sd = None if cfg.lora else engine._zero3_consolidated_16bit_state_dict() if z3 else engine.module.state_dict()
        if rank == 0 and cfg.lora:  # into a temp dir, then renamed (the full save does the same itself)
            shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
            model.save_pretrained(out_dir + ".tmp", save_embedding_layers=False)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(out_dir + ".tmp", out_dir)
        elif rank == 0:
            model.save_pretrained(out_dir, state_dict=sd)
    dist.barrier()


def save_resumable(engine, cfg: Config, step: int, rank: int):
    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    tag = f"step{step:07d}"
    state = {"step": step, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                   "torch": torch.get_rng_state()}}
    engine.save_checkpoint(ckpt, tag=tag, client_state=state, save_latest=False, exclude_frozen_parameters=cfg.lora)
    dist.barrier()
    if rank == 0:  # `latest` flips atomically only once every rank has written its shard
        Path(ckpt, "latest.tmp").write_text(tag)
        os.replace(os.path.join(ckpt, "latest.tmp"), os.path.join(ckpt, "latest"))
        for old in sorted(d for d in os.listdir(ckpt) if d.startswith("step"))[:-cfg.keep_last]:
            shutil.rmtree(os.path.join(ckpt, old), ignore_errors=True)
    dist.barrier()
    return os.path.join(ckpt, tag)


def pack_rollouts(rollouts: list, device) -> dict:
    """Completions -> one packed row (1, T): ids, labels (= ids where the model sampled the token, else ignored),
    position_ids restarting per completion, their images in order."""
    ids = [t for r in rollouts for t in r.token_ids]
    labels = [t if m else ovis.IGNORE_ID for r in rollouts for t, m in zip(r.token_ids, r.gen_mask)]
    pos = [i for r in rollouts for i in range(len(r.token_ids))]
    pv = [r.pixel_values for r in rollouts if r.pixel_values is not None]
    g = [r.grid_thws for r in rollouts if r.grid_thws is not None]
    t, cat = lambda x: torch.tensor([x], device=device), lambda x: torch.cat(x).to(device) if x else None
    return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos), "pixel_values": cat(pv),
            "grid_thws": cat(g)}


def token_logps(module, mb: dict, temperature: float) -> torch.Tensor:
    """(n,) log-probs of the sampled tokens of a packed row, in order."""
    return -module(**mb, loss_reduction="none", temperature=temperature).loss


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config):
    owns_group = not dist.is_initialized()
    rank, world, _ = data.setup_distributed(cfg.dist_timeout_s)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    if not (cfg.model_path or cfg.adapter) or not cfg.data_path:
        raise ValueError("model_path (or adapter) and data_path are required")
    n_local = cfg.prompts_per_rank * cfg.num_generations
    if n_local % cfg.micro_batch_size or cfg.num_generations < 2:
        raise ValueError(f"prompts_per_rank x num_generations ({n_local}) must be a multiple of micro_batch_size "
                         f"({cfg.micro_batch_size}), and num_generations >= 2")
    reward_fns = tools.parse_scorers(cfg.rewards)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    gas = n_local // cfg.micro_batch_size  # micro-batches per optimizer step, the same on every rank
    with open(cfg.zero_config) as f:
        ds_config = json.load(f)
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas, train_batch_size=gas * world)
    ds_config["bf16"] = {"enabled": cfg.bf16}
    z3 = ds_config["zero_optimization"].get("stage", 0) == 3

    path = ovis.resolve_checkpoint(cfg.model_path or ovis.adapter_base(cfg.adapter))  # Hub ids: once per node
    tokenizer = data.load_tokenizer(path)
    registry = tools.load_tools(cfg.tools, cfg.bbox_format, cfg.identify_map or None)
    prompts = load_prompts(cfg.data_path.split(","), cfg.image_dir, cfg.bbox_format)
    model = load_model(cfg, path, ds_config, rank)
    ref = None  # KL reference: a frozen copy (an engine without optimizer: partitioned under ZeRO-3, bf16 cast)
    if cfg.beta > 0 and not cfg.lora:  # LoRA: the policy's own weights with adapters disabled, no copy
        ref_cfg = ds_config if z3 else {**ds_config, "zero_optimization": {"stage": 0}}  # ZeRO-1/2 need an optimizer
        ref = load_model(cfg, path, ds_config, rank).requires_grad_(False)
        ref = deepspeed.initialize(model=ref, config=ref_cfg)[0]
        ref.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        base_name = cfg.model_path if not os.path.isdir(cfg.model_path) else os.path.abspath(path)
        if cfg.adapter:  # the new adapter sits on base + merged adapter: that model is its base, saved once
            base_name = os.path.abspath(os.path.join(cfg.output_dir, "base"))
            if rank == 0:
                model.save_pretrained(base_name)
            dist.barrier()
        model = get_peft_model(model, lora_config(cfg))
        pc = model.peft_config["default"]  # what peft readers load the adapter onto: a dir, or a Hub id + revision
        pc.base_model_name_or_path, pc.revision = ovis.split_hub_id(base_name)
    policy = model.get_base_model() if cfg.lora else model  # Ovis25 (with live adapters in LoRA mode)
    groups = param_groups(model, cfg)
    n_train = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    steps_per_epoch = len(prompts) // (cfg.prompts_per_rank * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(prompts)} prompts < prompts_per_rank x world = {cfg.prompts_per_rank * world}")
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_ratio * total * cfg.num_iterations)  # in optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warm + 1)))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    dev = engine.device

    step, ckpt, metrics_path = 0, os.path.join(cfg.output_dir, "checkpoints"), os.path.join(cfg.output_dir,
                                                                                           "metrics.jsonl")
    guard = data.RunGuard(cfg.max_skipped_steps, 0.0, engine.fp16_enabled(), cfg.output_dir)
    if cfg.resume:  # "auto": the latest checkpoint, if any; else a checkpoint dir
        latest = os.path.join(ckpt, "latest")
        ckpt, tag = (ckpt, Path(latest).read_text().strip() if os.path.exists(latest) else None) \
            if cfg.resume == "auto" else os.path.split(cfg.resume.rstrip("/"))
        if tag is not None:
            _, client = engine.load_checkpoint(ckpt, tag=tag, load_module_strict=not cfg.lora)
            if client is None:
                raise FileNotFoundError(f"could not load checkpoint {ckpt}/{tag}")
            step = client["step"]
            random.setstate(client["rng"]["python"])
            np.random.set_state(client["rng"]["numpy"])
            torch.set_rng_state(client["rng"]["torch"])
            guard.last_good = os.path.join(ckpt, tag)
            if rank == 0:
                data.trim_metrics(metrics_path, step)  # the steps after the checkpoint are run (and logged) again
            log(f"resumed from {ckpt}/{tag} at step {step}")
    reference = "none" if cfg.beta == 0 else "adapters disabled" if cfg.lora else "frozen copy"
    log(f"grpo: {cfg.model_path or path}{' + ' + cfg.adapter if cfg.adapter else ''}, {n_train / 1e6:.2f}M trainable "
        f"({'LoRA' if cfg.lora else cfg.train_modules}), reference {reference} | {len(prompts)} prompts, {total} "
        f"steps of {world} ranks x {cfg.prompts_per_rank} prompts x {cfg.num_generations} completions, {gas} "
        "micro-batches")
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tool_calls=
                    cfg.max_tool_calls, max_new_tokens=cfg.max_new_tokens, thinking_budget=cfg.thinking_budget or None,
                    crop_min_pixels=cfg.crop_min_pixels, crop_max_pixels=cfg.crop_max_pixels)

    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        order = random.Random(cfg.seed + epoch).sample(range(len(prompts)), len(prompts))  # the same on every rank
        start = (i * world + rank) * cfg.prompts_per_rank
        batch = [prompts[k] for k in order[start:start + cfg.prompts_per_rank]]

        # 1. rollouts through the shared tool loop (ZeRO-3: weights gathered once, partitioning hooks off)
        t0 = time.time()
        engine.eval()
        inputs = [prompt_inputs(s, cfg, tokenizer, registry) for s in batch]
        G = cfg.num_generations  # each prompt G times:
        prompt_ids, images, keys = ([x[k] for x in inputs for _ in range(G)] for k in range(3))
        with torch.no_grad(), deepspeed.runtime.zero.unwrap_model_for_generation(engine) if z3 else nullcontext():
            try:
                rolls = tools.run_tool_loop(policy, tokenizer, prompt_ids, images, keys, registry, **sampling)
            except FloatingPointError as e:  # the last update left non-finite weights
                raise data.RunError(guard.stop(step + 1, f"{e}: the run diverged")) from e
        t_roll = time.time() - t0

        # 2. rewards, group advantages, the loss normalisers over the global batch
        parts = {}
        for name, _, fn in reward_fns:  # tools.py's scorers, fn(rollout, sample); a failing one stops the run
            try:
                parts[name] = torch.tensor([float(fn(r, batch[j // G])) for j, r in enumerate(rolls)])
            except Exception as e:
                raise RuntimeError(f"reward {name!r} failed on a completion of {[s.get('id') for s in batch]}") from e
        reward = sum(w * parts[name] for name, w, _ in reward_fns).view(-1, G)  # (P, G)
        adv = group_advantages(reward, cfg.scale_rewards).view(-1)  # (P*G,)
        keep = (reward.std(1) > 0 if cfg.dynamic_sampling else torch.ones(len(batch), dtype=torch.bool))
        keep = keep.repeat_interleave(G)  # (P*G,)
        n_gen = torch.tensor([sum(r.gen_mask) for r in rolls])  # generated tokens per completion
        tot = torch.tensor([float(keep.sum()), float((n_gen * keep).sum())], device=dev, dtype=torch.float64)
        dist.all_reduce(tot)  # kept sequences and their tokens over all ranks: the loss denominators
        w = torch.tensor(token_weights(n_gen.tolist(), cfg.loss_type, max(tot[0].item(), 1), max(tot[1].item(), 1),
                                       cfg.max_new_tokens)) * keep
        mb_tok = n_gen.view(gas, -1).sum(1).tolist()  # tokens per micro-batch
        adv_tok = adv.repeat_interleave(n_gen).to(dev).split(mb_tok)  # per micro-batch, (n,) each
        w_tok = w.repeat_interleave(n_gen).to(dev).split(mb_tok)

        # 3. old and reference log-probs (no grad), then num_iterations clipped updates on the same rollouts
        t1 = time.time()
        mbs = [pack_rollouts(rolls[k:k + cfg.micro_batch_size], dev) for k in range(0, n_local, cfg.micro_batch_size)]
        with torch.no_grad():
            old = [token_logps(engine, mb, cfg.temperature) if cfg.num_iterations > 1 else None for mb in mbs]
            with model.disable_adapter() if cfg.lora else nullcontext():  # LoRA's reference: adapters off
                refs = [token_logps(engine if cfg.lora else ref, mb, cfg.temperature) if cfg.beta > 0 else None
                        for mb in mbs]
        engine.train()
        st_sum = torch.zeros(4, device=dev, dtype=torch.float64)  # clipped tokens, kl sum, tokens, loss
        for _ in range(cfg.num_iterations):
            for b, mb in enumerate(mbs):
                logp = token_logps(engine, mb, cfg.temperature)
                loss, st = policy_loss(logp, logp.detach() if old[b] is None else old[b], refs[b], adv_tok[b],
                                       w_tok[b], cfg)
                # the weights already divide by the global normaliser; engine.backward divides by gas and the
                # gradient all-reduce averages over ranks, so multiply both back. Never divide again.
                engine.backward(loss * gas * world)
                engine.step()
                st_sum += torch.stack([st["clipped"].sum(), st.get("kl", logp.new_zeros(1)).sum(),
                                       torch.tensor(logp.numel()), loss.detach()]).double()
        t_train = time.time() - t1
        step += 1

        # 4. logs: every reward component, accuracy, tool use, lengths, KL, clipping, time (sums over all ranks)
        ts = sum((tools.trajectory_stats(r, batch[j // G]) for j, r in enumerate(rolls)), Counter())
        sums = {"reward": reward.sum(), **{f"reward_{n}": parts[n].sum() for n, _, _ in reward_fns},
                **{k: ts[k] for k in ("accuracy", "tool_calls", "crops", "crops_ok", "gen_tokens")},
                "rollouts": len(rolls), "kept": keep.sum(), "group_std": reward.std(1).sum(), "groups": len(batch)}
        vals = torch.tensor([float(v) for v in sums.values()], device=dev, dtype=torch.float64)
        dist.all_reduce(vals)
        dist.all_reduce(st_sum)
        g = dict(zip(sums, vals.tolist()))
        n, n_tok = g["rollouts"], max(st_sum[2].item(), 1)
        rec = {"step": step, "epoch": epoch, **{k: g[k] / n for k in sums if k.startswith("reward")},
               "accuracy": g["accuracy"] / n, "tool_calls_per_rollout": g["tool_calls"] / n,
               "valid_crop_rate": g["crops_ok"] / max(g["crops"], 1), "response_len": g["gen_tokens"] / n,
               "kept_frac": g["kept"] / n, "group_reward_std": g["group_std"] / g["groups"],
               "kl": st_sum[1].item() / n_tok, "clip_frac": st_sum[0].item() / n_tok,
               "loss": st_sum[3].item() / cfg.num_iterations, "lr": sched.get_last_lr()[0],
               "grad_norm": float(engine.get_global_grad_norm() or 0), "rollout_s": t_roll, "train_s": t_train,
               "rollout_tok_per_s": g["gen_tokens"] / world / max(t_roll, 1e-9), "targets": g["gen_tokens"]}
        failure = guard.check(step, rec, engine.skipped_steps)  # "" = healthy; else never save or export
        if rank == 0:
            print(f"step {step}/{total} | " + " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in (
                "step", "epoch", "lr", "grad_norm", "loss")), flush=True)
            with open(metrics_path, "a") as f:
                f.write(data.metrics_line(rec))  # strict JSON: NaN / inf become null, named in "nonfinite"
        if failure:
            raise data.RunError(failure)
        if step % cfg.save_interval == 0 or step == total:
            guard.last_good = save_resumable(engine, cfg, step, rank)
    export(engine, model, cfg, os.path.join(cfg.output_dir, "final"), rank)
    log(f"done: {'adapter' if cfg.lora else 'model'} in {cfg.output_dir}/final")
    if owns_group:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    try:
        main(data.load_config(Config))
    except data.RunError as e:  # diverged: say so, exit non-zero, no final/
        sys.exit(f"grpo.py: error: {e}")
