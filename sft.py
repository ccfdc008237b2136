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

import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import deepspeed
import torch
import torch.distributed as dist

import common
import data
import hub
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
    max_dead_steps: int = 3  # this many steps in a row with a zero gradient norm (or a loss blown up) stop it
    max_loss_ratio: float = 4.0  # a loss above this many times its start is blown up; 0 = never

    def __post_init__(self):
        common.check_choices(self)  # Literal fields: a typo such as overlong="truncat" is an error


# ----------------------------------------------------------------------------------------------------------------
# helpers

SCRIPT = os.path.basename(__file__)  # named in messages: a copy of this script names itself


def trainable(cfg: Config, config: ovis.OvisConfig):
    """train_modules -> lr_of(parameter name): the module's lr, None (frozen) outside every chosen module."""
    chosen = [(ovis.module_prefix(config, m), lr) for m, lr in ovis.parse_modules(cfg.train_modules, cfg.lr)]
    if not chosen:
        raise common.ConfigError("train_modules is empty: nothing would train")
    return common.longest_prefix_lr(chosen)


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


def to_device(mb: dict, device) -> dict:
    keys = ("input_ids", "labels", "position_ids", "pixel_values", "grid_thws")
    return {k: mb[k].to(device) if mb[k] is not None else None for k in keys}


@torch.no_grad()
def evaluate(engine, eval_ds, cfg: Config, rank: int, world: int) -> float:
    """Token-weighted eval loss over the whole eval set, reduced across ranks. Every rank runs the same number of
    forwards (ZeRO-3 gathers are collectives): the packing route fills the last step with empty rows."""
    engine.eval()
    loader, _ = data.micro_batches(eval_ds, cfg.max_tokens, rank, world, 1, cfg.seed, fill="empty")
    tot = torch.zeros(2, device=engine.device, dtype=torch.float64)  # (loss sum, target tokens)
    for mb in loader:
        out = engine(**to_device(mb, engine.device), loss_reduction="sum")
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
        raise common.ConfigError("model_path and data_path are required")
    os.makedirs(cfg.output_dir, exist_ok=True)
    gas = cfg.gradient_accumulation_steps
    ds_config = common.engine_config(cfg.zero_config, SCRIPT, gas, world, cfg.bf16)  # + batch sizes, bf16

    # data first: a run with nothing to train on stops here, before a model is loaded. Sizes are known before
    # training, so the schedule covers exactly the steps that will run
    path = hub.resolve_checkpoint(cfg.model_path)  # a Hub id is downloaded once per node, then read from the cache
    mcfg, tokenizer = ovis.read_config(path), ovis.load_tokenizer(path)  # the config: parsed once, geometry and model
    enc = dict(budgets=data.Budgets.of(cfg), registry=tools.load_tools(cfg.tools, cfg.bbox_format), **mcfg.geometry)
    train_ds = data.SFTDataset(cfg.data_path.split(","), tokenizer, cfg.image_dir, log, required="data_path", **enc)
    eval_ds = data.SFTDataset(cfg.eval_data_path.split(","), tokenizer, cfg.eval_image_dir or cfg.image_dir, log,
                              required="eval_data_path", **enc) if cfg.eval_data_path else None
    _, steps_per_epoch = data.micro_batches(train_ds, cfg.max_tokens, rank, world, gas, cfg.seed)  # refuses samples
    if eval_ds is not None:  # longer than max_tokens, before any model loads
        data.micro_batches(eval_ds, cfg.max_tokens, rank, world)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    if total_steps <= 0:
        raise common.RunError(f"0 training steps (epochs={cfg.epochs}, max_steps={cfg.max_steps}): nothing would train")
    eval_every = cfg.eval_interval or steps_per_epoch
    save_every = cfg.save_interval or steps_per_epoch

    # model, trainable parameters, optimizer and schedule, engine
    model = ovis.load_for_training(path, mcfg, ds_config, rank, cfg.init_random, cfg.attn_implementation or None)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    groups = common.param_groups(model, trainable(cfg, mcfg), cfg.weight_decay)
    n_train = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])
    log(f"model: {cfg.model_path} | trainable {n_train / 1e6:.1f}M params | train_modules {cfg.train_modules} | "
        f"attention {ovis.attention_paths(cfg.attn_implementation, dtype=torch.bfloat16 if cfg.bf16 else None)}")
    opt = common.optimizer(groups, ds_config, cfg.lr, tuple(cfg.adam_betas or (0.9, 0.999)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))  # keeps per-group lrs
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)

    # resume: engine state, step, early-stopping and guard state, RNG; then the run is on record
    guard = common.RunGuard(cfg.max_skipped_steps, cfg.max_empty_step_frac, engine.fp16_enabled(), cfg.output_dir,
                            cfg.max_dead_steps, cfg.max_loss_ratio, mcfg.llm.vocab_size, total_steps=total_steps)
    step, state = common.resume(engine, cfg.resume, cfg.output_dir, {"best_eval": math.inf, "bad_evals": 0,
                                                                     "guard": {}}, log)
    best = common.read_best(cfg.output_dir)  # best/ may be newer than the checkpoint: never make it worse
    state["best_eval"] = state["best_eval"] if best is None else min(state["best_eval"], best)
    guard.load_state_dict(state["guard"], engine.skipped_steps)
    record = hub.training_record(cfg, SCRIPT, data.RECORDED)  # what exports carry: budgets, tools
    if rank == 0:
        common.write_run_config(cfg, cfg.output_dir)
    metrics = common.Metrics(cfg, rank)  # metrics.jsonl, tensorboard / wandb when asked (rank 0)
    log(f"training: {len(train_ds)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps, {world} ranks x "
        f"{gas} micro-batches of <= {cfg.max_tokens} tokens")

    # training loop
    engine.train()
    stop = False
    while step < total_steps and not stop:
        epoch, start = divmod(step, steps_per_epoch)
        loader, _ = data.micro_batches(train_ds, cfg.max_tokens, rank, world, gas, cfg.seed, epoch, start,
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
                    common.export_model(engine, model, os.path.join(cfg.output_dir, "best"), rank, record)
                    if rank == 0:
                        common.write_best(cfg.output_dir, rec["eval_loss"], step)
                else:
                    state["bad_evals"] += 1
                    stop = 0 < cfg.early_stopping_patience <= state["bad_evals"]
            if rank == 0 and (step % cfg.log_interval == 0 or step == total_steps or "eval_loss" in rec or failure):
                print(f"step {step}/{total_steps} | epoch {epoch} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                      f"grad_norm {rec['grad_norm']:.3f} | tok/s {rec['tokens_per_s']:.0f} | real "
                      f"{rec['real_token_frac']:.1%} | mem {rec['mem_gb']:.2f}GB"
                      + (f" | eval_loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else "")
                      + (f" | {rec['load_failures']} samples failed to load" if rec["load_failures"] else ""),
                      flush=True)
            metrics.write(rec)  # every step: strict JSON (NaN / inf become null, named in "nonfinite")
            if failure:
                raise common.RunError(failure)
            if step % save_every == 0 or step == total_steps or stop:
                state["guard"] = guard.state_dict()
                guard.last_good = common.save_resumable(engine, cfg.output_dir, step, state, cfg.keep_last, rank)
            if step >= total_steps or stop:
                break
    if stop:
        log(f"early stopping at step {step}: no eval improvement in {state['bad_evals']} evals "
            f"(best {state['best_eval']:.4f}, kept in {cfg.output_dir}/best)")
    common.export_model(engine, model, os.path.join(cfg.output_dir, "final"), rank, record)
    log(f"done: deployable model in {cfg.output_dir}/final{guard.summary()}")
    metrics.close()
    if owns_group:
        dist.destroy_process_group()
    return model  # the trained module (tests compare it with the export); partitioned under ZeRO-3


if __name__ == "__main__":
    common.run_cli(main, Config, __file__)  # a mistake to fix or a stopped run: one line, exit 1; Ctrl-C: exit 130
