"""Full fine-tuning of Ovis2.5 on raw DeepSpeed engines (ZeRO 0-3), with eval, early stopping and exact resume.

Launch:
    deepspeed --num_gpus 4 sft.py --config configs/sft_9b.json --lr=1e-5
    torchrun --nproc_per_node 2 sft.py --config configs/sft_2b.json
    python sft.py --config configs/demo_sft.json            # one process, CPU works too

Algorithm choices:
- Samples are packed into rows of <= max_tokens tokens (one row = one micro-batch, attention never crosses samples);
  every rank runs the same number of micro-batches per optimizer step (common.plan_epoch).
- Loss = sum of token cross-entropies / number of target tokens of the whole optimizer step, over all its
  micro-batches and all ranks, so gradient accumulation 4 x 1 equals 1 x 4 and long samples weigh by tokens.
- train_modules picks what trains ("llm:2e-5|visual_tokenizer:1e-5", official names); everything else is frozen.
  AdamW without weight decay on norms and biases; warmup then cosine / linear / constant, built in Python.
- Two checkpoint kinds: resumable (engine state + step + RNG, atomic `latest`) under output_dir/checkpoints, and
  deployable (official Ovis2.5 layout + tokenizer files) in output_dir/final and output_dir/best.
"""

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import deepspeed
import torch
import torch.distributed as dist

import common
import data
import model as ovis
import tools


@dataclass
class Config:
    # --- model and data
    model_path: str = ""  # official Ovis2.5 checkpoint: a dir, or a Hub id ("AIDC-AI/Ovis2.5-9B", "org/name@rev")
    init_random: bool = False  # random weights from model_path/config.json instead of its weights (demo, tests)
    data_path: str = ""  # training samples, JSON list or JSONL; several files separated by ","
    eval_data_path: str = ""  # optional eval samples in the same format
    image_dir: str = "."  # image paths in the samples are relative to this
    eval_image_dir: str = ""  # the same for the eval samples; "" = image_dir
    output_dir: str = "out/sft"  # checkpoints/, final/, best/, metrics.jsonl
    zero_config: str = "zero_configs/zero2.json"  # engine policy: ZeRO stage, offload, bf16, clipping, buckets
    # --- what trains
    train_modules: str = "all"  # "|"-separated: all, llm, visual_tokenizer, visual_tokenizer.head,
    #                             visual_tokenizer.vit, visual_tokenizer.vit.last_block, vte; each may carry "name:lr"
    # --- optimisation
    lr: float = 2e-5  # peak learning rate of modules without their own
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    warmup_ratio: float = 0.03  # fraction of all steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay (never on norms and biases)
    adam_betas: list | None = None  # default [0.9, 0.999]
    epochs: int = 1  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    max_tokens: int = 8192  # tokens per packed micro-batch (row) per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step per rank
    max_length: int = 8192  # longest sample in tokens; longer ones follow `overlong`
    overlong: Literal["drop", "truncate"] = "drop"  # drop (counted, reported) | truncate (never inside a visual)
    # pixel budgets (spec 11.2), video frames, tool-result crops: defaults in data.Budgets, as the official trainer's
    single_image_min_pixels: int = data.Budgets.single_image_min_pixels  # one image
    single_image_max_pixels: int = data.Budgets.single_image_max_pixels
    multiple_image_min_pixels: int = data.Budgets.multiple_image_min_pixels  # each of several images
    multiple_image_max_pixels: int = data.Budgets.multiple_image_max_pixels
    video_min_pixels: int = data.Budgets.video_min_pixels  # each video frame
    video_max_pixels: int = data.Budgets.video_max_pixels
    min_frames: int = data.Budgets.min_frames  # a video is resampled to between min_frames and max_frames
    max_frames: int = data.Budgets.max_frames
    crop_min_pixels: int = data.Budgets.crop_min_pixels  # image tool results (Crop) inserted in a conversation
    crop_max_pixels: int = data.Budgets.crop_max_pixels
    bbox_format: Literal["pixel", "norm", "norm1000"] = "pixel"  # Crop boxes in the data
    tools: str = "Crop|Identify"  # the tools the data calls: built-in names or module:Class (tools.load_tools)
    bf16: bool = True  # overrides the zero config's bf16.enabled
    gradient_checkpointing: bool = True  # recompute activations in backward (ViT and LLM)
    attn_implementation: Literal["", "varlen", "flash_attention_2", "sdpa", "flex_attention", "eager"] = ""  # README
    seed: int = 42  # model init, data order
    # --- eval, saving, logging
    log_interval: int = 1  # optimizer steps between log lines (metrics.jsonl gets every step)
    eval_interval: int = 0  # optimizer steps between evals; 0 = once per epoch
    save_interval: int = 0  # optimizer steps between resumable checkpoints; 0 = once per epoch
    keep_last: int = 2  # resumable checkpoints kept
    early_stopping_patience: int = 0  # stop after this many evals without improvement; 0 = off
    early_stopping_min_delta: float = 0.0  # improvement smaller than this does not count
    resume: str = ""  # "" = fresh start, "auto" = latest in output_dir/checkpoints, or a checkpoint dir
    tensorboard: bool = False  # also log to output_dir/tensorboard
    wandb_project: str = ""  # also log to this wandb project
    num_workers: int = 0  # DataLoader workers (image decoding)
    dist_timeout_s: int = 1800  # collective timeout; a hung rank fails loudly after this
    # --- when to stop a run that went wrong (never ends "done" on garbage)
    max_skipped_steps: int = 3  # fp16: more overflow-skipped steps in a row stop the run
    max_empty_step_frac: float = 0.1  # more steps than this share without any target token (all ranks) stop it

    def __post_init__(self):
        common.check_choices(self)  # Literal fields: a typo such as overlong="truncat" is an error


# ----------------------------------------------------------------------------------------------------------------
# helpers

def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Freeze everything, then unfreeze the chosen modules; more specific names win their lr. Norm weights and
    biases (1-D) get no weight decay."""
    chosen = [(ovis.module_prefix(model.config, m), lr) for m, lr in ovis.parse_modules(cfg.train_modules, cfg.lr)]
    if not chosen:
        raise ValueError("train_modules is empty: nothing would train")
    groups: dict = {}
    for name, p in model.named_parameters():
        lr = None
        for prefix, mod_lr in sorted(chosen, key=lambda x: len(x[0])):  # longest matching prefix last, so it wins
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                lr = mod_lr
        p.requires_grad_(lr is not None)
        if lr is not None:
            wd = 0.0 if p.ndim < 2 else cfg.weight_decay
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_lambda(cfg: Config, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:  # multiplier of each group's own peak lr
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def load_model(cfg: Config, path: str, ds_config: dict, rank: int) -> ovis.Ovis25:
    """Under ZeRO-3 the model is built partitioned (deepspeed.zero.Init) and filled tensor by tensor from rank 0,
    so no rank ever holds a full replica; otherwise a plain load. `path`: cfg.model_path resolved to a local dir."""
    with open(os.path.join(path, "config.json")) as f:
        mcfg = ovis.OvisConfig.from_dict(json.load(f))
    attn = cfg.attn_implementation or None
    if ds_config["zero_optimization"].get("stage", 0) == 3:
        # zero.Init skips the Qwen3 init: a random model is built plainly (tiny ones) and copied in
        src = ovis.Ovis25.from_config(mcfg, attn_implementation=attn).state_dict() if cfg.init_random else None
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            m = ovis.Ovis25(mcfg, attn)
        def copy(p, t):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(t)
        if src is not None:
            for name, p in m.named_parameters():
                copy(p, src[name])
        else:
            ovis.load_weights(m, path, copy)
    elif cfg.init_random:
        m = ovis.Ovis25.from_config(mcfg, attn_implementation=attn)
    else:
        m = ovis.Ovis25.from_pretrained(path, attn_implementation=attn)
    m.source_dir = os.path.abspath(path)  # exports copy its config.json keys, tokenizer and code files
    return m


def export(engine, model: ovis.Ovis25, out_dir: str, rank: int):
    """Deployable checkpoint in the official layout. Under ZeRO-3 the weights are gathered first (a collective:
    every rank calls this)."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=sd)
    dist.barrier()


def save_resumable(engine, cfg: Config, step: int, state: dict, rank: int):
    ckpt = os.path.join(cfg.output_dir, "checkpoints")
    tag = f"step{step:07d}"
    state = {**state, "step": step, "rng": common.rng_state()}
    engine.save_checkpoint(ckpt, tag=tag, client_state=state, save_latest=False)
    dist.barrier()
    if rank == 0:  # `latest` flips atomically only once every rank has written its shard
        with open(os.path.join(ckpt, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(ckpt, "latest.tmp"), os.path.join(ckpt, "latest"))
        tags = sorted(d for d in os.listdir(ckpt) if d.startswith("step"))
        for old in tags[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt, old), ignore_errors=True)
    dist.barrier()
    return os.path.join(ckpt, tag)


def to_device(mb: dict, device) -> dict:
    keys = ("input_ids", "labels", "position_ids", "pixel_values", "grid_thws")
    return {k: mb[k].to(device) if mb[k] is not None else None for k in keys}


@torch.no_grad()
def evaluate(engine, eval_ds, cfg: Config, rank: int, world: int) -> float:
    """Token-weighted eval loss over the whole eval set, reduced across ranks. Every rank runs the same number of
    forwards (ZeRO-3 gathers are collectives); a rank without a row left re-runs a row with weight 0."""
    engine.eval()
    rows = common.pack(eval_ds.lengths, cfg.max_tokens, cfg.seed, 0)
    tot = torch.zeros(2, device=engine.device, dtype=torch.float64)  # (loss sum, target tokens)
    for i in range(-(-len(rows) // world)):
        j = i * world + rank
        mb = data.collate([[eval_ds[k] for k in rows[min(j, len(rows) - 1)]]])
        out = engine(**to_device(mb, engine.device), loss_reduction="sum")
        if j < len(rows):
            tot += torch.stack([out.loss.double(), torch.tensor(float(out.n_targets), device=engine.device)])
    dist.all_reduce(tot)
    engine.train()
    return (tot[0] / tot[1].clamp(min=1)).item()


def memory_gb() -> float:  # peak: GPU memory allocated, else the process's resident set
    import resource
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config):
    owns_group = not dist.is_initialized()  # tests run several mains in one process group
    rank, world, _ = common.setup_distributed(cfg.dist_timeout_s)
    common.seed_all(cfg.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    if not cfg.model_path or not cfg.data_path:
        raise ValueError("model_path and data_path are required")
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    # engine policy from the zero config; the script owns batch sizes, optimizer and schedule
    with open(cfg.zero_config) as f:
        ds_config = json.load(f)
    for k in ("optimizer", "scheduler"):
        if k in ds_config:
            raise ValueError(f"{cfg.zero_config}: remove {k!r}; sft.py builds the optimizer and LR schedule itself")
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                     train_batch_size=cfg.gradient_accumulation_steps * world)
    ds_config["bf16"] = {"enabled": cfg.bf16}

    # data first: a run with nothing to train on stops here, before a model is loaded. Sizes are known before
    # training, so the schedule covers exactly the steps that will run
    path = common.resolve_checkpoint(cfg.model_path)  # a Hub id is downloaded once per node, then read from the cache
    tokenizer = ovis.load_tokenizer(path)
    enc = dict(budgets=data.Budgets.of(cfg), registry=tools.load_tools(cfg.tools, cfg.bbox_format),
               **ovis.patch_geometry(path))  # the checkpoint's own patch size and merge stride
    train_ds = data.SFTDataset(cfg.data_path.split(","), tokenizer, cfg.image_dir, log, required="data_path", **enc)
    eval_ds = data.SFTDataset(cfg.eval_data_path.split(","), tokenizer, cfg.eval_image_dir or cfg.image_dir, log,
                              required="eval_data_path", **enc) if cfg.eval_data_path else None
    gas = cfg.gradient_accumulation_steps
    steps_per_epoch = len(common.plan_epoch(train_ds.lengths, cfg.max_tokens, world, gas, cfg.seed, 0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    if total_steps <= 0:
        raise common.RunError(f"0 training steps (epochs={cfg.epochs}, max_steps={cfg.max_steps}): nothing would train")
    eval_every = cfg.eval_interval or steps_per_epoch
    save_every = cfg.save_interval or steps_per_epoch

    # model, trainable parameters
    model = load_model(cfg, path, ds_config, rank)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    groups = param_groups(model, cfg)
    n_train = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])
    log(f"model: {cfg.model_path} | trainable {n_train / 1e6:.1f}M params | train_modules {cfg.train_modules} | "
        f"attention {ovis.attention_paths(cfg.attn_implementation, dtype=torch.bfloat16 if cfg.bf16 else None)}")

    betas = tuple(cfg.adam_betas or (0.9, 0.999))
    if ds_config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload needs DeepSpeed's CPU Adam
        opt = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=torch.cuda.is_available())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))  # keeps per-group lrs
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)

    # resume: engine state, step, early-stopping state, RNG
    state = {"best_eval": float("inf"), "bad_evals": 0}
    step, metrics_path = 0, os.path.join(cfg.output_dir, "metrics.jsonl")
    guard = common.RunGuard(cfg.max_skipped_steps, cfg.max_empty_step_frac, engine.fp16_enabled(), cfg.output_dir)
    if cfg.resume:
        ckpt = os.path.join(cfg.output_dir, "checkpoints") if cfg.resume == "auto" else os.path.dirname(
            cfg.resume.rstrip("/"))
        tag = None if cfg.resume == "auto" else os.path.basename(cfg.resume.rstrip("/"))
        if cfg.resume == "auto" and os.path.exists(os.path.join(ckpt, "latest")):
            with open(os.path.join(ckpt, "latest")) as f:
                tag = f.read().strip()
        if tag is not None:
            _, client = engine.load_checkpoint(ckpt, tag=tag)
            if client is None:
                raise FileNotFoundError(f"could not load checkpoint {ckpt}/{tag}")
            step = client["step"]
            state = {k: client[k] for k in state}
            common.set_rng_state(client["rng"])
            best = common.best_score(cfg.output_dir)  # best/ may be newer than this checkpoint: never make it worse
            state["best_eval"] = state["best_eval"] if best is None else min(state["best_eval"], best)
            guard.last_good, guard.seen_skips = os.path.join(ckpt, tag), engine.skipped_steps
            if rank == 0:
                common.trim_metrics(metrics_path, step)  # the steps after the checkpoint are run (and logged) again
            log(f"resumed from {ckpt}/{tag} at step {step}")
        else:
            log("resume=auto: no checkpoint yet, starting fresh")

    tb, wb = common.loggers(cfg, rank)  # tensorboard / wandb writers when the config asks for them (rank 0)
    log(f"training: {len(train_ds)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps, {world} ranks x "
        f"{gas} micro-batches of <= {cfg.max_tokens} tokens")

    # training loop
    engine.train()
    stop = False
    while step < total_steps and not stop:
        epoch, start = divmod(step, steps_per_epoch)
        loader = data.micro_batches(train_ds, cfg.max_tokens, rank, world, gas, cfg.seed, epoch, start,
                                    cfg.num_workers)
        batches = iter(loader)
        for _ in range(start, steps_per_epoch):
            t0 = time.time()
            mbs = [next(batches) for _ in range(gas)]
            # target tokens of the whole step, all micro-batches and ranks: the loss denominator
            counts = torch.tensor([sum(mb["n_target_tokens"] for mb in mbs),
                                   sum(int((mb["input_ids"] != ovis.PAD_ID).sum()) for mb in mbs),
                                   sum(mb["input_ids"].numel() for mb in mbs), sum(mb["n_failed"] for mb in mbs)],
                                  device=engine.device, dtype=torch.float64)
            dist.all_reduce(counts)
            n_targets = counts[0].clamp(min=1)
            loss_sum = torch.zeros((), device=engine.device, dtype=torch.float64)
            grad_norm = None
            for i, mb in enumerate(mbs):
                out = engine(**to_device(mb, engine.device), loss_reduction="sum")
                # engine.backward divides by gas and the gradient all-reduce averages over ranks, so scaling by
                # gas * world / n_targets leaves exactly d(sum of token losses / n_targets). Never divide again.
                engine.backward(out.loss * (gas * world / n_targets).to(out.loss.dtype))
                if i == gas - 1 and engine.zero_optimization_stage() == 0:  # ZeRO stages report it themselves
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                              if p.grad is not None]).item()
                engine.step()
                loss_sum += out.loss.detach().double()
            dist.all_reduce(loss_sum)
            step += 1
            dt = time.time() - t0
            rec = {"step": step, "epoch": epoch, "loss": (loss_sum / n_targets).item(),
                   "lr": sched.get_last_lr()[0],
                   "grad_norm": grad_norm if grad_norm is not None else float(engine.get_global_grad_norm() or 0),
                   "tokens_per_s": counts[1].item() / dt, "real_token_frac": (counts[1] / counts[2]).item(),
                   "targets": int(counts[0]), "load_failures": int(counts[3]), "mem_gb": memory_gb(), "time_s": dt}
            failure = guard.check(step, rec, engine.skipped_steps)  # "" = healthy; else never eval, save or export
            if step % eval_every == 0 and eval_ds is not None and not failure:
                rec["eval_loss"] = evaluate(engine, eval_ds, cfg, rank, world)
                if rec["eval_loss"] < state["best_eval"] - cfg.early_stopping_min_delta:
                    state.update(best_eval=rec["eval_loss"], bad_evals=0)
                    export(engine, model, os.path.join(cfg.output_dir, "best"), rank)
                    rank == 0 and common.best_score(cfg.output_dir, rec["eval_loss"], step)
                else:
                    state["bad_evals"] += 1
                    stop = 0 < cfg.early_stopping_patience <= state["bad_evals"]
            if rank == 0:
                if step % cfg.log_interval == 0 or step == total_steps or "eval_loss" in rec or failure:
                    print(f"step {step}/{total_steps} | epoch {epoch} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e}"
                          f" | grad_norm {rec['grad_norm']:.3f} | tok/s {rec['tokens_per_s']:.0f} | real "
                          f"{rec['real_token_frac']:.1%} | mem {rec['mem_gb']:.2f}GB"
                          + (f" | eval_loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else "")
                          + (f" | {rec['load_failures']} samples failed to load" if rec["load_failures"] else ""),
                          flush=True)
                with open(metrics_path, "a") as f:
                    f.write(common.metrics_line(rec))  # strict JSON: NaN / inf become null, named in "nonfinite"
                for k, v in rec.items():
                    tb and math.isfinite(v) and tb.add_scalar(f"train/{k}", v, step)
                wb and wb.log(rec, step=step)
            if failure:
                raise common.RunError(failure)
            if step % save_every == 0 or step == total_steps or stop:
                guard.last_good = save_resumable(engine, cfg, step, state, rank)
            if step >= total_steps or stop:
                break
    if stop:
        log(f"early stopping at step {step}: no eval improvement in {state['bad_evals']} evals "
            f"(best {state['best_eval']:.4f}, kept in {cfg.output_dir}/best)")
    export(engine, model, os.path.join(cfg.output_dir, "final"), rank)
    log(f"done: deployable model in {cfg.output_dir}/final{guard.summary()}")
    tb and tb.close()
    wb and wb.finish()
    if owns_group:
        dist.destroy_process_group()
    return model  # the trained module (tests compare it with the export); partitioned under ZeRO-3


if __name__ == "__main__":
    try:
        main(common.load_config(Config))
    except common.RunError as e:  # diverged, or nothing to train on: say so, exit non-zero, no final/
        sys.exit(f"sft.py: error: {e}")
