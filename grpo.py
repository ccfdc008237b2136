"""GRPO for Ovis2.5 tool use: real multi-turn Crop/Identify rollouts, verifiable rewards, tool outputs masked.

Launch:
    deepspeed --num_gpus 8 grpo.py --config configs/grpo_9b.json
    torchrun --nproc_per_node 2 grpo.py --config configs/demo_grpo.json --lora=true
    python grpo.py --config configs/demo_grpo.json          # tiny model, CPU; after the SFT demo (README)

Algorithm choices (one optimizer step per rollout batch, repeated num_iterations times):
- Rollouts: num_generations completions per prompt through tools.run_tool_loop (the inference loop), sharing the
  prompt's ViT pass and prefill; each tool call runs on the sample's own image and its result is appended as
  training renders it. Only sampled tokens carry loss. ZeRO-3: the weights are gathered for the rollout (a full
  bf16 copy per GPU meanwhile, 18 GB for the 9B), so ranks decoding different lengths never wait on each other.
- Rewards: weighted tools.py scorers (format, accuracy, iou, tool, the seed's tool_usage, bbox_validity,
  reasoning_quality; shared with infer.py --score) or your fn(rollout, sample) by dotted path, each logged.
- Advantages per group: r - mean, divided by std + 1e-4 when scale_rewards (Dr. GRPO: false). dynamic_sampling
  (DAPO): a group with all rewards equal has no signal and is replaced by a fresh prompt's (up to
  max_refill_rounds, every rank in step), else kept out of the loss and its normaliser.
- Loss per generated token: -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) + beta k3, rho = pi /
  pi_old (the rollout policy, scored before the updates when num_iterations > 1), k3 = exp(ref - logp) - (ref -
  logp) - 1 to the start model (LoRA: adapters disabled; full: a frozen copy). loss_type: grpo = mean per sequence
  then over sequences; bnpo = sum / tokens (DAPO); dr_grpo = sum / (sequences x max_new_tokens); global batch.
- Held-out eval (eval_data_path) at step 0 and every eval_interval steps with the same metrics; best/ by
  eval_metric, early stopping, checkpoints, resume, optimizer and logging as sft.py.
- Start: an SFT result (model_path), or a base + a lora.py `adapter` merged at load; lora=true trains fresh
  adapters on top, else train_modules (per-module lrs) as in sft.py.
"""

import functools
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

import common
import data
import model as ovis
import tools


@dataclass
class Config:
    # --- model and data
    model_path: str = ""  # checkpoint to start from (an SFT result; a dir or a Hub id), or the base of `adapter`
    adapter: str = ""  # optional lora.py adapter dir, merged into model_path (default: its recorded base) (ZeRO 0-2)
    data_path: str = ""  # samples: image, conversations up to the question (or "question"), answer, bbox
    eval_data_path: str = ""  # held-out prompts in the same format
    image_dir: str = "."  # image paths in the samples are relative to this
    eval_image_dir: str = ""  # the same for the eval prompts; "" = image_dir
    tools: str = "Crop|Identify"  # the tools rollouts run: built-in names or module:Class (tools.load_tools)
    identify_map: str = ""  # Identify backend: JSON {image path: [{"bbox": [...], "name": ...}]}; "" = none
    output_dir: str = "out/grpo"  # checkpoints/, final/, best/, metrics.jsonl
    zero_config: str = "zero_configs/zero2.json"  # engine policy
    # --- what trains
    lora: bool = False  # train LoRA adapters on the LLM (reference = adapters disabled) instead of train_modules
    lora_r: int = 16  # adapter rank
    lora_alpha: float = 32  # adapter scale alpha / r
    train_modules: str = "llm"  # full mode: "|"-separated names as sft.py's, each may carry its own lr as "name:lr"
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
    dynamic_sampling: bool = False  # replace zero-variance groups by fresh prompts' (DAPO), else drop them
    max_refill_rounds: int = 3  # extra rollout rounds per step to replace zero-variance groups
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "bnpo"  # normaliser of the token losses
    epsilon_low: float = 0.2  # ratio clip below 1
    epsilon_high: float = 0.28  # ratio clip above 1 (clip-higher)
    num_iterations: int = 1  # optimizer steps per rollout batch (PPO epochs)
    beta: float = 0.0  # KL (k3) weight to the reference; 0 = no reference forward
    # --- optimisation
    lr: float = 1e-6  # peak learning rate of modules without their own (adapters: use ~1e-5)
    adam_betas: list | None = None  # default [0.9, 0.99]
    warmup_ratio: float = 0.0  # linear warmup over this fraction of the updates, then a constant lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never on norms and biases)
    epochs: int = 1  # passes over the prompts (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps on new rollouts; 0 = from epochs
    bf16: bool = True  # overrides the zero config's bf16.enabled
    gradient_checkpointing: bool = True  # recompute activations in backward (ViT and LLM)
    attn_implementation: Literal["", "varlen", "flash_attention_2", "sdpa", "flex_attention", "eager"] = ""  # README
    seed: int = 42  # prompt order, sampling, adapter init
    # --- eval, saving, logging
    eval_interval: int = 0  # steps between held-out evals (and one at step 0); 0 = no eval
    eval_num_generations: int = 1  # completions per eval prompt; 1 = greedy
    eval_metric: str = "accuracy"  # eval value that keeps best/ (higher is better): accuracy, reward, reward_<name>
    early_stopping_patience: int = 0  # stop after this many evals without improvement; 0 = off
    early_stopping_min_delta: float = 0.0  # improvement smaller than this does not count
    save_interval: int = 50  # steps between resumable checkpoints (and a deployable final/ at the end)
    keep_last: int = 2  # resumable checkpoints kept
    resume: str = ""  # "" = fresh start, "auto" = latest in output_dir/checkpoints, or a checkpoint dir
    tensorboard: bool = False  # also log to output_dir/tensorboard
    wandb_project: str = ""  # also log to this wandb project
    dist_timeout_s: int = 1800  # collective timeout; a hung rank fails loudly after this
    max_skipped_steps: int = 3  # fp16: more overflow-skipped steps in a row stop the run

    def __post_init__(self):
        common.check_choices(self)  # Literal fields: a typo is an error


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


def prompt_inputs(s: dict, cfg: Config, tokenizer, registry) -> tuple[dict, list, list]:
    """A sample -> (ovis.build_inputs dict, its opened images, their keys); the tool system prompt is added when
    the sample has no system turn."""
    image_dir = s.get("_image_dir", cfg.image_dir)
    msgs = data.prompt_messages(s, image_dir)
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": [{"type": "text", "text": registry.system_prompt()}]}] + msgs
    keys = [s["image"]] if isinstance(s["image"], str) else list(s["image"])
    images = [Image.open(os.path.join(image_dir, k)).convert("RGB") for k in keys]
    return ovis.build_inputs(msgs, tokenizer, enable_thinking=cfg.enable_thinking, min_pixels=cfg.min_pixels,
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
    """LoRA: the adapters, at lr. Full: freeze everything, then unfreeze the train_modules; more specific names win
    their lr (as sft.py). Norm weights and biases (1-D) get no weight decay."""
    chosen = [] if cfg.lora else [(ovis.module_prefix(model.config, m), lr)
                                  for m, lr in ovis.parse_modules(cfg.train_modules, cfg.lr)]
    if not (cfg.lora or chosen):
        raise ValueError("train_modules is empty: nothing would train")
    groups: dict = {}
    for name, p in model.named_parameters():
        lr = cfg.lr if cfg.lora and "lora_" in name else None
        for prefix, mod_lr in sorted(chosen, key=lambda x: len(x[0])):  # longest matching prefix last, so it wins
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                lr = mod_lr
        p.requires_grad_(lr is not None)
        if lr is not None:
            wd = 0.0 if p.ndim < 2 else cfg.weight_decay
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


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


def save_resumable(engine, cfg: Config, step: int, state: dict, rank: int):
    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    tag = f"step{step:07d}"
    state = {**state, "step": step, "rng": common.rng_state()}
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
# the blocks of a step: draw prompts, roll out, score, refill, log


def draw(prompts: list, cursor: int, cfg: Config, rank: int, world: int, limit: int) -> list | None:
    """This rank's prompts_per_rank prompts of draw number `cursor` (a draw = prompts_per_rank x world prompts; each
    epoch is a fresh shuffle, the same on every rank); None once `limit` draws are used up (the data ran out)."""
    per_epoch = len(prompts) // (cfg.prompts_per_rank * world)
    if limit and cursor >= limit:
        return None
    epoch, i = divmod(cursor, per_epoch)
    order = random.Random(cfg.seed + epoch).sample(range(len(prompts)), len(prompts))
    start = (i * world + rank) * cfg.prompts_per_rank
    return [prompts[k] for k in order[start:start + cfg.prompts_per_rank]]


def rollout(engine, policy, tokenizer, registry, cfg: Config, batch: list, n: int, greedy: bool = False) -> list:
    """Block 1: n completions of each prompt (rank-local; the n share one ViT pass and prefill). ZeRO-3: the weights
    are gathered once (a collective: every rank calls this, even with no prompt)."""
    inputs = [prompt_inputs(s, cfg, tokenizer, registry) for s in batch]
    z3 = engine.zero_optimization_stage() == 3
    with torch.no_grad(), deepspeed.runtime.zero.unwrap_model_for_generation(engine) if z3 else nullcontext():
        return tools.run_tool_loop(
            policy, tokenizer, *([x[k] for x in inputs] for k in range(3)), registry, max_tool_calls=cfg.max_tool_calls,
            max_new_tokens=cfg.max_new_tokens, group=n, thinking_budget=cfg.thinking_budget or None,
            crop_min_pixels=cfg.crop_min_pixels, crop_max_pixels=cfg.crop_max_pixels, do_sample=not greedy,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) if inputs else []


def score(rolls: list, batch: list, reward_fns: list, n: int) -> list[dict]:
    """Block 2: each reward component of each completion (tools.py's scorers, fn(rollout, sample); a failing one stops
    the run, never a silent 0) -> one group per prompt: {sample, rolls, parts {name: (n,)}, reward (n,)}."""
    parts = {}
    for name, _, fn in reward_fns:
        try:
            parts[name] = torch.tensor([float(fn(r, batch[j // n])) for j, r in enumerate(rolls)])
        except Exception as e:
            raise RuntimeError(f"reward {name!r} failed on a completion of {[s.get('id') for s in batch]}") from e
    cut = lambda v, i: v[i * n:(i + 1) * n]  # noqa: E731 (prompt i's n completions)
    return [{"sample": s, "rolls": cut(rolls, i), "parts": {k: cut(v, i) for k, v in parts.items()},
             "reward": sum(w * cut(parts[k], i) for k, w, _ in reward_fns)} for i, s in enumerate(batch)]


def rollout_metrics(groups: list, prefix: str = "") -> dict:
    """Block 4: sums over all ranks -> means of the reward and each component, accuracy, format rate, tool calls per
    rollout, valid-crop rate, mean crop IoU, response length (tools.summarize; None: nothing to measure)."""
    local = Counter()
    for g in groups:
        for r in g["rolls"]:
            local.update(tools.trajectory_stats(r, g["sample"]))
        local.update({"reward": float(g["reward"].sum()), **{f"reward_{k}": float(v.sum()) for k, v in
                                                            g["parts"].items()}})
    everyone, tot = [None] * dist.get_world_size(), Counter()
    dist.all_gather_object(everyone, dict(local))
    for x in everyone:
        tot.update(x)
    names = {"tool_calls_per_question": "tool_calls_per_rollout", "mean_generated_tokens": "response_len"}
    return {**{f"{prefix}{k}": tot[k] / max(tot["questions"], 1) for k in sorted(tot) if k.startswith("reward")},
            **{prefix + names.get(k, k): v for k, v in tools.summarize(tot).items() if isinstance(v, float | None)}}


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config):
    owns_group = not dist.is_initialized()  # tests run several mains in one process group
    rank, world, _ = common.setup_distributed(cfg.dist_timeout_s)
    common.seed_all(cfg.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    if not (cfg.model_path or cfg.adapter) or not cfg.data_path:
        raise ValueError("model_path (or adapter) and data_path are required")
    G, n_local = cfg.num_generations, cfg.prompts_per_rank * cfg.num_generations
    if n_local % cfg.micro_batch_size or G < 2:
        raise ValueError(f"prompts_per_rank x num_generations ({n_local}) must be a multiple of micro_batch_size "
                         f"({cfg.micro_batch_size}), and num_generations >= 2")
    reward_fns = tools.parse_scorers(cfg.rewards)
    metric_names = ["accuracy", "format_rate", "mean_crop_iou", "reward"] + [f"reward_{n}" for n, _, _ in reward_fns]
    if cfg.eval_metric not in metric_names:
        raise ValueError(f"eval_metric: {cfg.eval_metric!r}; choose from {', '.join(metric_names)}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    # engine policy from the zero config; the script owns batch sizes, optimizer and schedule
    with open(cfg.zero_config) as f:
        ds_config = json.load(f)
    for k in ("optimizer", "scheduler"):
        if k in ds_config:
            raise ValueError(f"{cfg.zero_config}: remove {k!r}; grpo.py builds the optimizer and LR schedule itself")
    gas = n_local // cfg.micro_batch_size  # micro-batches per optimizer step, the same on every rank
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas, train_batch_size=gas * world)
    ds_config["bf16"] = {"enabled": cfg.bf16}
    z3 = ds_config["zero_optimization"].get("stage", 0) == 3

    # prompts first: a run with nothing to train on stops here, before a model is loaded
    path = common.resolve_checkpoint(cfg.model_path or ovis.adapter_base(cfg.adapter))  # Hub ids: once per node
    tokenizer = ovis.load_tokenizer(path)
    registry = tools.load_tools(cfg.tools, cfg.bbox_format, cfg.identify_map or None)
    prompts = data.load_prompts(cfg.data_path.split(","), cfg.image_dir, cfg.bbox_format)
    eval_prompts = data.load_prompts(cfg.eval_data_path.split(","), cfg.eval_image_dir or cfg.image_dir,
                                     cfg.bbox_format) if cfg.eval_data_path else []
    steps_per_epoch = len(prompts) // (cfg.prompts_per_rank * world)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    if steps_per_epoch == 0 or total <= 0:
        raise common.RunError(f"nothing to train on: {len(prompts)} prompts for {world} ranks x {cfg.prompts_per_rank} "
                            f"prompts a step, epochs={cfg.epochs}, max_steps={cfg.max_steps}")
    draws = 0 if cfg.max_steps > 0 else total  # prompt draws the epochs hold (refills use them up too); 0 = endless

    # model, reference, trainable parameters
    model = load_model(cfg, path, ds_config, rank)
    ref = None  # KL reference: a frozen copy (an engine without optimizer: partitioned under ZeRO-3, bf16 cast)
    if cfg.beta > 0 and not cfg.lora:  # LoRA: the policy's own weights with adapters disabled, no copy
        ref_cfg = ds_config if z3 else {**ds_config, "zero_optimization": {"stage": 0}}  # ZeRO-1/2 need an optimizer
        ref = deepspeed.initialize(model=load_model(cfg, path, ds_config, rank).requires_grad_(False),
                                   config=ref_cfg)[0]
        ref.eval()  # (DeepSpeedEngine.eval returns None)
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
        pc.base_model_name_or_path, pc.revision = common.split_hub_id(base_name)
    policy = model.get_base_model() if cfg.lora else model  # Ovis25 (with live adapters in LoRA mode)
    groups = param_groups(model, cfg)
    n_train = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])

    betas = tuple(cfg.adam_betas or (0.9, 0.99))
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
    if offload and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload needs DeepSpeed's CPU Adam
        opt = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=torch.cuda.is_available())
    warm = int(cfg.warmup_ratio * total * cfg.num_iterations)  # in optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warm + 1)))  # keeps group lrs
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    dev, roller = engine.device, functools.partial(rollout, engine, policy, tokenizer, registry, cfg)

    # resume: engine state, step, prompt cursor, early-stopping state, RNG
    state = {"best_eval": float("-inf"), "bad_evals": 0, "cursor": 0}  # cursor: prompt draws so far
    step, metrics_path = 0, os.path.join(cfg.output_dir, "metrics.jsonl")
    guard = common.RunGuard(cfg.max_skipped_steps, 0.0, engine.fp16_enabled(), cfg.output_dir)
    if cfg.resume:
        ckpt = os.path.join(cfg.output_dir, "checkpoints") if cfg.resume == "auto" else os.path.dirname(
            cfg.resume.rstrip("/"))
        tag = None if cfg.resume == "auto" else os.path.basename(cfg.resume.rstrip("/"))
        if cfg.resume == "auto" and os.path.exists(os.path.join(ckpt, "latest")):
            tag = Path(ckpt, "latest").read_text().strip()
        if tag is not None:
            _, client = engine.load_checkpoint(ckpt, tag=tag, load_module_strict=not cfg.lora)
            if client is None:
                raise FileNotFoundError(f"could not load checkpoint {ckpt}/{tag}")
            step = client["step"]
            state = {**state, "cursor": step, **{k: client[k] for k in state if k in client}}  # older: no cursor
            common.set_rng_state(client["rng"])
            best = common.best_score(cfg.output_dir)  # best/ may be newer than this checkpoint: never make it worse
            state["best_eval"] = state["best_eval"] if best is None else max(state["best_eval"], best)
            guard.last_good, guard.seen_skips = os.path.join(ckpt, tag), engine.skipped_steps
            if rank == 0:
                common.trim_metrics(metrics_path, step)  # the steps after the checkpoint are run (and logged) again
            log(f"resumed from {ckpt}/{tag} at step {step}")
        else:
            log("resume=auto: no checkpoint yet, starting fresh")

    tb, wb = common.loggers(cfg, rank)  # tensorboard / wandb writers when the config asks for them (rank 0)
    reference = "none" if cfg.beta == 0 else "adapters disabled" if cfg.lora else "frozen copy"
    log(f"grpo: {cfg.model_path or path}{' + ' + cfg.adapter if cfg.adapter else ''}, {n_train / 1e6:.2f}M trainable "
        f"({'LoRA' if cfg.lora else cfg.train_modules}), reference {reference} | {len(prompts)} prompts, "
        f"{len(eval_prompts)} eval prompts, {total} steps of {world} ranks x {cfg.prompts_per_rank} prompts x {G} "
        f"completions, {gas} micro-batches | attention "
        f"{ovis.attention_paths(cfg.attn_implementation, dtype=torch.bfloat16 if cfg.bf16 else None)}")

    def write(rec: dict):  # one log line and one metrics.jsonl record (strict JSON), on rank 0
        if rank == 0:
            shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "step")
            print(("eval | " if "eval_reward" in rec else "") + f"step {rec['step']}/{total} | " + " | ".join(shown),
                  flush=True)
            with open(metrics_path, "a") as f:
                f.write(common.metrics_line(rec))
            for k, v in rec.items():
                tb and isinstance(v, (int, float)) and np.isfinite(v) and tb.add_scalar(f"grpo/{k}", v, rec["step"])
            wb and wb.log(rec, step=rec["step"])

    def evaluate() -> bool:
        """The held-out prompts, sharded over ranks; best/ kept by eval_metric. True: early stopping says stop."""
        engine.eval()
        mine, n = eval_prompts[rank::world], cfg.eval_num_generations
        rec = {"step": step, **rollout_metrics(score(roller(mine, n, greedy=n == 1), mine, reward_fns, n), "eval_")}
        value = rec[f"eval_{cfg.eval_metric}"] if rec[f"eval_{cfg.eval_metric}"] is not None else float("-inf")
        if value > state["best_eval"] + cfg.early_stopping_min_delta:
            state.update(best_eval=value, bad_evals=0)
            export(engine, model, cfg, os.path.join(cfg.output_dir, "best"), rank)
            rank == 0 and common.best_score(cfg.output_dir, value, step)
        else:
            state["bad_evals"] += 1
        write(rec)
        return 0 < cfg.early_stopping_patience <= state["bad_evals"]

    stop = bool(eval_prompts and cfg.eval_interval and step == 0 and evaluate())  # the start is on the curve
    while step < total and not stop:
        # 1. rollouts (the completions of a prompt share its prefill); dynamic_sampling: groups without reward
        #    variance are replaced by fresh prompts' groups, every rank in step (collectives must not hang)
        t0 = time.time()
        engine.eval()
        batch = draw(prompts, state["cursor"], cfg, rank, world, draws)
        if batch is None:
            log(f"the prompts ran out after {state['cursor']} draws (refills used them up): stopping at step {step}")
            break
        state["cursor"] += 1
        try:
            groups = score(roller(batch, G), batch, reward_fns, G)  # 2. scoring (named block)
            rounds, drawn, ran_out = 0, len(batch), False
            while cfg.dynamic_sampling and rounds < cfg.max_refill_rounds:
                flat = [i for i, g in enumerate(groups) if g["reward"].std() == 0]
                need = torch.tensor(float(len(flat)), device=dev)
                dist.all_reduce(need, op=dist.ReduceOp.MAX)  # any rank short: every rank draws again
                more = draw(prompts, state["cursor"], cfg, rank, world, draws) if need.item() else None
                if more is None:
                    ran_out = need.item() > 0
                    break
                state["cursor"], rounds, drawn = state["cursor"] + 1, rounds + 1, drawn + len(more)
                fresh = [g for g in score(roller(more, G), more, reward_fns, G) if g["reward"].std() > 0]
                for i, g in zip(flat, fresh):
                    groups[i] = g
        except FloatingPointError as e:  # the last update left non-finite weights
            raise common.RunError(guard.stop(step + 1, f"{e}: the run diverged")) from e
        if ran_out:
            log(f"step {step + 1}: the prompts ran out while refilling: training on what there is")
        t_roll = time.time() - t0

        # 2. group advantages, the loss normalisers over the global batch
        rolls = [r for g in groups for r in g["rolls"]]
        reward = torch.stack([g["reward"] for g in groups])  # (P, G)
        adv = group_advantages(reward, cfg.scale_rewards).view(-1)  # (P*G,)
        keep = (reward.std(1) > 0 if cfg.dynamic_sampling else torch.ones(len(groups), dtype=torch.bool))
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
        st_sum, grad_norm = torch.zeros(4, device=dev, dtype=torch.float64), None  # clipped, kl sum, tokens, loss
        for _ in range(cfg.num_iterations):
            for b, mb in enumerate(mbs):
                logp = token_logps(engine, mb, cfg.temperature)
                loss, st = policy_loss(logp, logp.detach() if old[b] is None else old[b], refs[b], adv_tok[b],
                                       w_tok[b], cfg)
                # the weights already divide by the global normaliser; engine.backward divides by gas and the
                # gradient all-reduce averages over ranks, so multiply both back. Never divide again.
                engine.backward(loss * gas * world)
                if b == gas - 1 and engine.zero_optimization_stage() == 0:  # ZeRO stages report it themselves
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                              if p.grad is not None]).item()
                engine.step()
                st_sum += torch.stack([st["clipped"].sum(), st.get("kl", logp.new_zeros(1)).sum(),
                                       torch.tensor(logp.numel()), loss.detach()]).double()
        t_train = time.time() - t1
        step += 1

        # 4. metrics (named block): every reward component, accuracy, tool use, lengths, KL, clipping, refills, time
        more = torch.tensor([float(keep.sum()), float(reward.std(1).sum()), len(groups), drawn, float(n_gen.sum())],
                            device=dev, dtype=torch.float64)
        dist.all_reduce(st_sum)
        dist.all_reduce(more)
        n_tok = max(st_sum[2].item(), 1)
        rec = {"step": step, "epoch": (state["cursor"] - 1) // steps_per_epoch, **rollout_metrics(groups),
               "kept_frac": more[0].item() / (more[2].item() * G), "group_reward_std": more[1].item() / more[2].item(),
               "refill_rounds": rounds, "prompts_drawn": int(more[3]), "kl": st_sum[1].item() / n_tok,
               "clip_frac": st_sum[0].item() / n_tok, "loss": st_sum[3].item() / cfg.num_iterations,
               "lr": sched.get_last_lr()[0],
               "grad_norm": grad_norm if grad_norm is not None else float(engine.get_global_grad_norm() or 0),
               "rollout_s": t_roll, "train_s": t_train, "rollout_tok_per_s": more[4].item() / world / max(t_roll, 1e-9),
               "targets": int(more[4])}
        failure = guard.check(step, rec, engine.skipped_steps)  # "" = healthy; else never eval, save or export
        write(rec)
        if failure:
            raise common.RunError(failure)
        if eval_prompts and cfg.eval_interval and step % cfg.eval_interval == 0:
            stop = evaluate()
        if step % cfg.save_interval == 0 or step == total or stop:
            guard.last_good = save_resumable(engine, cfg, step, state, rank)
    if stop:
        log(f"early stopping at step {step}: no eval improvement in {state['bad_evals']} evals "
            f"(best {cfg.eval_metric} {state['best_eval']:.4f}, kept in {cfg.output_dir}/best)")
    export(engine, model, cfg, os.path.join(cfg.output_dir, "final"), rank)
    log(f"done: {'adapter' if cfg.lora else 'model'} in {cfg.output_dir}/final")
    tb and tb.close()
    wb and wb.finish()
    if owns_group:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    try:
        main(common.load_config(Config))
    except common.RunError as e:  # diverged, or nothing to train on: say so, exit non-zero, no final/
        sys.exit(f"grpo.py: error: {e}")
