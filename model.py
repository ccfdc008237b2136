"""Ovis2.5 in one readable file: SigLIP2-NaViT vision encoder -> visual tokenizer -> Qwen3 LLM.

Loads and saves the official checkpoints (AIDC-AI/Ovis2.5-2B / -9B layout, key names and config.json) without
`trust_remote_code`, and reproduces the official outputs (tests/fixtures/golden_a). The contract it implements is
the Ovis2.5 specification: preprocessing (smart_resize + Pillow bilinear + merge-block patch order), the ViT with
resized learned position table + 2-D rotary + full/windowed attention segments, the 2x2 merge, the visual head
(Linear -> LayerNorm eps 1e-5 -> softmax) and the visual embedding table (vte) whose soft tokens replace the
placeholder ids in the LLM input. The LLM is transformers' own `Qwen3ForCausalLM`, used unmodified.

What we add over the official code: packed rows (several samples per row, attention never crosses them), a chunked
cross-entropy that never materialises fp32 logits for every token, batched generation with a per-sequence thinking
budget, and `GenState` to continue a finished generation from its KV cache (the tool loop and GRPO rollouts).
"""

import copy
import fnmatch
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM  # imported up front: never inside zero.Init

import common
import hub

# ----------------------------------------------------------------------------------------------------------------
# Constants of the released models

IGNORE_ID = -100
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = -200, -201  # `<image>` / `<video>` placeholders in tokenized text
PLACEHOLDERS = {"<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_TOKEN_ID}
VISUAL_ATOM_ID = -300  # one per 2x2 patch block, replaced by a soft visual embedding
INDICATOR_IDS = (-301, -302, -303, -304)  # image start/end, video start/end: the last 4 rows of vte
PAD_ID, IM_END_ID, THINK_END_ID = 151643, 151645, 151668  # <|endoftext|>, <|im_end|>, </think>
TOOL_CALL_END_ID = 151658  # `</tool_call>`: a tool-loop row stops there, its call runs, the result is appended
EMPTY_THINK_IDS = (151667, 271, 151668, 271)  # "<think>\n\n</think>\n\n": how a prompt without thinking ends
EOS_IDS = (IM_END_ID, PAD_ID)  # generation_config.json of the released checkpoints
# "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.
# \n</think>\n\n" tokenized: forced when the thinking budget runs out (spec 10.2)
THINK_EARLY_STOP_IDS = (271, 82796, 279, 7199, 882, 553, 279, 1196, 11, 358, 614, 311, 2968, 279, 6291, 3118, 389,
                        279, 7274, 5961, 1431, 624, 151668, 271)
# the KV cache keyword of Qwen3ForCausalLM.forward: `cache` since transformers 5.2x, `past_key_values` before
CACHE_KW = "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"
# files of a checkpoint directory that are not weights nor config.json: an export copies them byte for byte
AUX_FILES = ("tokenizer*", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "chat_template*",
             "preprocessor_config.json", "processor_config.json", "generation_config.json", "*.py", common.RECORD_FILE)

# ----------------------------------------------------------------------------------------------------------------
# Config: parsed from the official config.json; unknown keys are kept and written back on save


@dataclass
class ViTConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    image_size: int = 512  # the learned position table is (image_size / patch_size)^2 entries
    layer_norm_eps: float = 1e-6
    hidden_stride: int = 2  # 2x2 patches merge into one visual token
    window_size: int = 112  # windowed attention: (window_size // hidden_stride // patch_size) merged cells a side
    fullatt_block_indexes: list | None = None  # None: every layer full attention (the released models)
    temporal_patch_size: int = 1
    preserve_original_pe: bool = True
    use_rope: bool = True
    hidden_act: str = "gelu_pytorch_tanh"


# llm_config keys of the released checkpoints, in the spelling transformers 4.51 (the official code) and 5.x both read
# (5.x's own to_dict writes `rope_parameters`, which 4.x ignores: it would silently run RoPE with base 10000)
LLM_CONFIG_KEYS = ("architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim",
                   "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
                   "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers",
                   "num_key_value_heads", "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window",
                   "tie_word_embeddings", "use_cache", "use_sliding_window", "vocab_size")


def rope_theta(llm) -> float:
    """The RoPE base a transformers Qwen3Config runs with (5.x keeps it in rope_parameters, 4.x in rope_theta)."""
    params = getattr(llm, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(llm, "rope_theta", None))


@dataclass
class OvisConfig:
    vit: ViTConfig
    llm: object  # transformers.Qwen3Config
    hidden_size: int = 4096
    visual_vocab_size: int = 65536
    raw: dict = field(default_factory=dict)  # the config.json as read: an export writes it back, key for key

    @classmethod
    def from_dict(cls, d: dict) -> "OvisConfig":
        d = copy.deepcopy(d)  # `raw` must stay the source's JSON, whatever the parsers below do to their inputs
        v = dict(d.get("vit_config") or {})
        fb = v.get("fullatt_block_indexes")
        if isinstance(fb, str):  # the official form: "7|15|23"
            fb = [x for x in fb.split("|") if x.strip() != ""]
        v["fullatt_block_indexes"] = None if fb is None else [int(x) for x in fb]
        vit = ViTConfig(**{k: val for k, val in v.items() if k in ViTConfig.__dataclass_fields__})
        if vit.temporal_patch_size != 1:
            raise ValueError("temporal_patch_size != 1 cannot work with the Conv2d patch embedding (spec 13.6)")
        llm_d = copy.deepcopy({k: val for k, val in (d.get("llm_config") or {}).items() if k != "architectures"})
        llm = Qwen3Config(**llm_d)
        llm.tie_word_embeddings = bool(llm_d.get("tie_word_embeddings", False))
        hidden = int(d.get("hidden_size", llm.hidden_size))
        if hidden != llm.hidden_size:
            raise ValueError(f"config hidden_size {hidden} != llm_config.hidden_size {llm.hidden_size}")
        if "llm_config" in d and "rope_theta" not in d["llm_config"]:
            warnings.warn(f"config.json: llm_config has no rope_theta (transformers 5.x spelling only?): transformers "
                          f"4.x readers, the official remote code among them, run RoPE with base 10000 instead of "
                          f"{rope_theta(llm):g}. Exports of this model write rope_theta.", stacklevel=3)
        return cls(vit=vit, llm=llm, hidden_size=hidden, visual_vocab_size=int(d.get("visual_vocab_size", 65536)),
                   raw=d)

    @property
    def geometry(self) -> dict:
        """How this checkpoint cuts images: build_inputs / encode_sample / tool_result_pixels take these keywords."""
        return {"patch_size": self.vit.patch_size, "hidden_stride": self.vit.hidden_stride}

    def to_dict(self, dtype: torch.dtype | None = None) -> dict:
        """config.json of an export: the source's JSON as read, so every reader (official remote code, vLLM, 5.x)
        sees what it saw in the source, except `torch_dtype` (the written weights') and a missing llm rope_theta.
        Parts the source lacks (a config built in code) are written as the released checkpoints spell them."""
        d = copy.deepcopy(self.raw)
        if not d.get("llm_config"):
            llm = self.llm.to_dict()
            scaling = {k: v for k, v in (getattr(self.llm, "rope_parameters", None) or {}).items() if k != "rope_theta"}
            llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=rope_theta(self.llm),
                       rope_scaling=None if scaling.get("rope_type", "default") == "default" else scaling,
                       tie_word_embeddings=bool(self.llm.tie_word_embeddings))
            d["llm_config"] = {k: llm[k] for k in LLM_CONFIG_KEYS if k in llm}
        elif d["llm_config"].get("rope_theta") != rope_theta(self.llm):
            d["llm_config"]["rope_theta"] = rope_theta(self.llm)
        if not d.get("vit_config"):
            vit = {k: getattr(self.vit, k) for k in ViTConfig.__dataclass_fields__}
            fb = self.vit.fullatt_block_indexes
            vit.update(fullatt_block_indexes=None if fb is None else "|".join(str(i) for i in fb),
                       model_type="siglip2_navit", num_patches=-1, attention_dropout=0.0)
            d["vit_config"] = dict(sorted(vit.items()))
        for k, val in (("architectures", ["Ovis2_5"]), ("model_type", "ovis2_5"), ("hidden_size", self.hidden_size),
                       ("visual_vocab_size", self.visual_vocab_size),
                       ("auto_map", {"AutoConfig": "configuration_ovis2_5.Ovis2_5_Config",
                                     "AutoModelForCausalLM": "modeling_ovis2_5.Ovis2_5"}),
                       ("conversation_formatter_class", "Qwen3ConversationFormatter")):
            d.setdefault(k, val)
        if dtype is not None:  # the source's spelling of the key (transformers 5.x writes "dtype")
            d["dtype" if "dtype" in d and "torch_dtype" not in d else "torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


# train_modules names of the official trainer (spec 11.5), shared by sft.py, lora.py and grpo.py
TRAIN_MODULES = ("all", "llm", "visual_tokenizer", "visual_tokenizer.head", "visual_tokenizer.vit",
                 "visual_tokenizer.vit.last_block", "vte")


def parse_modules(spec: str, default_lr: float, allowed=TRAIN_MODULES, key: str = "train_modules") -> list:
    """"llm:2e-5|vte" -> [("llm", 2e-5), ("vte", default_lr)]; a name outside `allowed` is an error."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split("|"))):
        name, _, lr = part.partition(":")
        if name not in allowed:
            raise ValueError(f"{key}: unknown module {name!r}; choose from {', '.join(allowed)}")
        out.append((name, float(lr) if lr else default_lr))
    return out


def module_prefix(config: OvisConfig, name: str) -> str:
    """A train_modules name -> its parameter-name prefix ("" = all); last_block: the ViT's last layer (official)."""
    if name == "all":
        return ""
    if name == "visual_tokenizer.vit.last_block":
        return f"visual_tokenizer.vit.vision_model.encoder.layers.{config.vit.num_hidden_layers - 1}"
    return name


# ----------------------------------------------------------------------------------------------------------------
# Attention dispatch, one place. attn_implementation: one of ATTN_CHOICES, "" = auto: flash-attn's kernels when the
# package is installed, else "varlen": on CUDA in bf16/fp16 the ViT's segments and the LLM's packed rows run through
# torch's FlashAttention varlen kernel (cu_seqlens, no T x T mask), elsewhere and in generation (KV cache) SDPA.
ATTN_CHOICES = ("", "varlen", "flash_attention_2", "sdpa", "flex_attention", "eager")


def flash_attn_installed() -> bool:  # looked up, never imported here: the package is optional and heavy
    return importlib.util.find_spec("flash_attn") is not None


def attention_paths(requested: str, device=None, dtype=torch.bfloat16, flash: bool | None = None) -> dict:
    """What runs where (the decision table, logged by the stage scripts; device default: CUDA when present):
    {"llm": training / scoring forward, "vit": the vision encoder, "generation": decoding with the KV cache}."""
    if requested not in ATTN_CHOICES:
        raise ValueError(f"attn_implementation: {requested!r}; choose from {', '.join(map(repr, ATTN_CHOICES))}")
    flash = flash_attn_installed() if flash is None else flash
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _torch_varlen()
    if requested == "flash_attention_2" or (requested == "" and flash):
        return {"llm": "flash_attention_2", "vit": "flash_attn varlen", "generation": "flash_attention_2"}
    if requested in ("", "varlen"):
        k = "torch varlen" if fast else "sdpa"
        return {"llm": k, "vit": k, "generation": "sdpa"}
    return {"llm": requested, "vit": "sdpa", "generation": requested}


def varlen_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) position ids restarting at 0 for every sample (padding: a run of its own) -> cu_seqlens (n + 1,) int32
    over the flattened B*T tokens and the longest segment: the varlen kernels' view of packed rows."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    starts = starts if len(starts) and starts[0] == 0 else F.pad(starts, (1, 0))
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _torch_varlen():
    try:  # torch >= 2.9
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    except ImportError:
        return None


def _varlen_kernel(tensor: torch.Tensor):
    """The varlen kernel for this tensor: torch's (CUDA, bf16/fp16), else None (SDPA). Tests swap in the reference."""
    return _torch_varlen() if tensor.is_cuda and tensor.dtype in (torch.float16, torch.bfloat16) else None


def _llm_varlen_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers' attention interface, "ovis_varlen": q (B, Hq, T, D), k / v (B, Hkv, S, D) -> (B, T, Hq, D).
    Packed rows (no mask, no cache: S == T) on a varlen kernel; anything else (a padded batch, decoding) SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = _varlen_kernel(q)
    if kernel is None or attention_mask is not None or k.shape[2] != q.shape[2]:
        return sdpa_attention_forward(module, q, k, v, attention_mask, scaling=scaling, dropout=dropout, **kw)
    b, h, t, d = q.shape
    pos = kw.get("position_ids")
    pos = torch.arange(t, device=q.device)[None] if pos is None else pos
    cu, longest = varlen_seqlens(pos.expand(b, -1))
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # noqa: E731
    out = kernel(flat(q), flat(k), flat(v), cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                 enable_gqa=k.shape[1] != h)
    return out.view(b, t, h, d), None


def _llm_varlen_mask(*, attention_mask=None, device=None, dtype=None, **kw):
    """The mask creator of "ovis_varlen": none where the varlen kernel runs (packed rows on CUDA), else SDPA's."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and _varlen_kernel(torch.empty(0, device=device, dtype=dtype)) is not None:
        return None
    return sdpa_mask(attention_mask=attention_mask, device=device, dtype=dtype, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Image / video preprocessing (spec 4): bit-exact with the official SigLIP processor path under pillow<13


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The official resize rule: both sides multiples of `factor`, area within [min_pixels, max_pixels] (round() is
    banker's rounding, as there). ValueError where the official code would give a 0-pixel side or divide by zero."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if height < factor or width < factor:  # scale the short side up to `factor`; the aspect clamp is skipped
        if height < width:
            width, height = round(factor / height * width), factor
        else:
            height, width = round(factor / width * height), factor
    elif height / width > 200:  # aspect ratio clamped to 200
        height = 200 * width
    elif width / height > 200:
        width = 200 * height
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise ValueError(f"smart_resize({height}, {width}, factor={factor}, min_pixels={min_pixels}, "
                         f"max_pixels={max_pixels}) gives a 0-pixel side {h_bar}x{w_bar}: raise max_pixels")
    return h_bar, w_bar


def _to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL image -> (3, H, W) float32 in [-1, 1], step for step as SiglipImageProcessor (mean = std = 0.5)."""
    if image.mode != "RGB":
        image = image.convert("RGB")  # RGBA: alpha dropped (no compositing), as the official code
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.BILINEAR)
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * 0.00392156862745098).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return x.transpose(2, 0, 1)


def _patchify(frames: np.ndarray, patch_size: int, hidden_stride: int, temporal_patch_size: int):
    """(T, C, H, W) -> pixel_values (N, C*tps*ps*ps) in merge-block order, grid_thw [t, h, w] in patches."""
    if frames.shape[0] % temporal_patch_size:
        pad = np.repeat(frames[-1:], temporal_patch_size - frames.shape[0] % temporal_patch_size, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    t, c, h, w = frames.shape
    ps, hs, tps = patch_size, hidden_stride, temporal_patch_size
    gt, gh, gw = t // tps, h // ps, w // ps
    x = frames.reshape(gt, tps, c, gh // hs, hs, ps, gw // hs, hs, ps)
    # -> (t, block row, block col, sub row, sub col, C, tps, ps, ps): 4 consecutive rows = one 2x2 block
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tps * ps * ps)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([[gt, gh, gw]], dtype=torch.long)


def preprocess_image(image: Image.Image, min_pixels: int = 448 * 448, max_pixels: int = 1792 * 1792,
                     patch_size: int = 16, hidden_stride: int = 2, temporal_patch_size: int = 1):
    """One PIL image -> (pixel_values (N, 3*ps*ps) float32, grid_thws (1, 3) int64): a one-frame video."""
    return preprocess_video([image], min_pixels, max_pixels, patch_size, hidden_stride, temporal_patch_size)


def preprocess_video(frames: list, min_pixels: int = 448 * 448, max_pixels: int = 896 * 896,
                     patch_size: int = 16, hidden_stride: int = 2, temporal_patch_size: int = 1):
    """A list of PIL frames -> one grid [T, h, w]; every frame is resized to the first frame's target size."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    h, w = smart_resize(frames[0].height, frames[0].width, patch_size * hidden_stride, min_pixels, max_pixels)
    return _patchify(np.stack([_to_array(f, h, w) for f in frames]), patch_size, hidden_stride, temporal_patch_size)


def num_visual_tokens(grid_thw, hidden_stride: int = 2, temporal_patch_size: int = 1) -> int:
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (hidden_stride * hidden_stride * temporal_patch_size)


def expand_placeholders(ids: list, grid_thws, hidden_stride: int = 2, temporal_patch_size: int = 1) -> list:
    """Replace the k-th -200 (or -201) by [start] + [-300] * n_k + [end] with n_k from the k-th grid. Counts must
    match: a placeholder without an image (or an image without a placeholder) is an error, not token 0."""
    grids = [] if grid_thws is None else [list(g) for g in grid_thws]
    out, k = [], 0
    for i in ids:
        if i in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID):
            if k >= len(grids):
                raise ValueError(f"{k + 1} image/video placeholders but only {len(grids)} images")
            start, end = (INDICATOR_IDS[0], INDICATOR_IDS[1]) if i == IMAGE_TOKEN_ID else INDICATOR_IDS[2:]
            out += [start] + [VISUAL_ATOM_ID] * num_visual_tokens(grids[k], hidden_stride, temporal_patch_size) + [end]
            k += 1
        else:
            out.append(i)
    if k != len(grids):
        raise ValueError(f"{len(grids)} images but {k} placeholders")
    return out


def image_grid(size, min_pixels: int, max_pixels: int, patch_size: int = 16, hidden_stride: int = 2) -> torch.Tensor:
    """grid_thw (1, 3) of an image of size (W, H), without decoding it (the rule of preprocess_image)."""
    h, w = smart_resize(size[1], size[0], patch_size * hidden_stride, min_pixels, max_pixels)
    return torch.tensor([[1, h // patch_size, w // patch_size]])


# ----------------------------------------------------------------------------------------------------------------
# Prompts (spec 9.2-9.3): the checkpoint's chat template -> model inputs, as the official preprocess_inputs


def load_tokenizer(path: str):
    """The Qwen3 tokenizer of a checkpoint dir, by class (AutoTokenizer would ask to run the official remote code)."""
    from transformers import Qwen2TokenizerFast
    return Qwen2TokenizerFast.from_pretrained(path)


def tokenize_with_placeholders(texts, tokenizer, placeholders=("<image>", "<video>")):
    """Split each text on the placeholders, tokenize the chunks (no special tokens, one batched call) and join them
    with the placeholder ids (-200 / -201). Chunk-wise tokenization is part of the contract (9.3)."""
    single = isinstance(texts, str)
    pat = re.compile("(" + "|".join(re.escape(p) for p in placeholders) + ")")
    pieces = [pat.split(t) for t in ([texts] if single else texts)]  # even: text chunk, odd: placeholder
    chunks = [c for ps in pieces for c in ps[0::2]]
    enc = iter(tokenizer(chunks, add_special_tokens=False)["input_ids"] if chunks else [])
    out = [[i for j, p in enumerate(ps) for i in (next(enc) if j % 2 == 0 else [PLACEHOLDERS[p]])] for ps in pieces]
    return out[0] if single else out


def build_inputs(messages: list[dict], tokenizer, enable_thinking: bool = False, add_generation_prompt: bool = True,
                 min_pixels: int = 448 * 448, max_pixels: int = 1792 * 1792, patch_size: int = 16,
                 hidden_stride: int = 2) -> dict:
    """Chat messages -> {input_ids (1, L) with expanded placeholders, pixel_values (N, 3*ps*ps) | None, grid_thws
    (n, 3) | None, prompt}. The tokenizer's chat template writes `<image>` / `<video>` per content item (never from
    text) and keeps only the answer of assistant history; image items hold a PIL image or a path, video items a list."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
    visuals = [(it["type"], it[it["type"]]) for m in messages if not isinstance(m["content"], str)
               for it in m["content"] if it.get("type") in ("image", "video")]
    ph = "<video>" if any(kind == "video" for kind, _ in visuals) else "<image>"
    if text.count(ph) != len(visuals):  # as the official code: one video alone, or images, in user/system turns
        raise ValueError(f"{len(visuals)} image/video items but {text.count(ph)} {ph} in the prompt: a video cannot "
                         "be combined with other visuals, and assistant turns hold text only")
    ids = tokenize_with_placeholders(text, tokenizer, (ph,))
    geo = dict(patch_size=patch_size, hidden_stride=hidden_stride)
    image = lambda x: x if isinstance(x, Image.Image) else Image.open(x).convert("RGB")
    pv = [preprocess_video([image(f) for f in x], min_pixels, max_pixels, **geo) if kind == "video" else
          preprocess_image(image(x), min_pixels, max_pixels, **geo) for kind, x in visuals]
    grids = torch.cat([g for _, g in pv]) if pv else None
    ids = expand_placeholders(ids, grids, hidden_stride)
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "pixel_values": torch.cat([p for p, _ in pv]) if pv
            else None, "grid_thws": grids, "prompt": text}


# ----------------------------------------------------------------------------------------------------------------
# Vision encoder: SigLIP2-NaViT (spec 5). Module names mirror the checkpoint keys
# visual_tokenizer.vit.vision_model.{embeddings, encoder.layers.{l}, post_layernorm}.


def _block_order(x: torch.Tensor, hs: int) -> torch.Tensor:
    """(h, w, ...) grid -> (h*w, ...) rows in merge-block order (block row, block col, sub row, sub col)."""
    h, w = x.shape[:2]
    x = x.reshape(h // hs, hs, w // hs, hs, *x.shape[2:]).transpose(1, 2)
    return x.reshape(h * w, *x.shape[4:])


def _segments(seg_ids: torch.Tensor) -> dict:
    """Attention segments from one id per token: the token order that makes them contiguous (+ cu_seqlens, for the
    varlen kernels) and, for SDPA, (n_segments, L) index matrices: one batched call per length, no (N, N) mask."""
    _, dense = torch.unique(seg_ids, return_inverse=True)
    order = torch.argsort(dense, stable=True)
    counts = torch.bincount(dense)
    cu = F.pad(torch.cumsum(counts, 0), (1, 0))  # each segment's start in `order`, then the total
    groups = [order[cu[:-1][counts == n][:, None] + torch.arange(n, device=seg_ids.device)]  # (segments of length n, n)
              for n in torch.unique(counts).tolist()]
    return {"order": order, "cu_seqlens": cu.to(torch.int32), "max_len": int(counts.max()), "groups": groups}


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight  # (D, C, ps, ps): a conv with stride = kernel is a matmul on patches
        x = F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1), self.patch_embedding.bias)  # (N, D)
        if not self.cfg.preserve_original_pe:
            return x
        s = self.cfg.image_size // self.cfg.patch_size
        table = self.position_embedding.weight.reshape(s, s, -1).permute(2, 0, 1)[None]  # (1, D, S, S)
        pes, cache = [], {}
        for t, h, w_ in grid_thws.tolist():
            if (h, w_) not in cache:  # bicubic, no antialias, in the parameter dtype (as the official code)
                pe = F.interpolate(table, size=(h, w_), mode="bicubic", align_corners=False)[0]  # (D, h, w)
                cache[(h, w_)] = _block_order(pe.permute(1, 2, 0), self.cfg.hidden_stride)  # (h*w, D)
            pes.append(cache[(h, w_)].repeat(t, 1))  # frames share the same table, no temporal embedding
        return x + torch.cat(pes)


class VisionAttention(nn.Module):
    attn = ""  # the model's attn_implementation (Ovis25 sets it): picks the varlen kernel below

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def kernel(self, x: torch.Tensor):
        """flash-attn's varlen function (installed, CUDA, half precision), torch's varlen kernel, or None (SDPA)."""
        half = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        if half and self.attn in ("", "flash_attention_2") and flash_attn_installed():
            from flash_attn import flash_attn_varlen_func
            return flash_attn_varlen_func
        return _varlen_kernel(x) if self.attn in ("", "varlen") else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg: dict) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cos is not None:  # 2-D rotary on q and k, computed in fp32 (N, 1, d)
            q, k = ((t.float() * cos + _rotate_half(t.float()) * sin).to(v.dtype) for t in (q, k))
        kernel = self.kernel(x)
        if kernel is not None:  # segments contiguous, one varlen call (flash-attn's or torch's)
            o = seg["order"]
            out = kernel(q[o], k[o], v[o], seg["cu_seqlens"], seg["cu_seqlens"], seg["max_len"], seg["max_len"])
            out = out[torch.argsort(o)]
        else:  # SDPA, one batched call per segment length: (n_seg, heads, L, d)
            outs = []
            for idx in seg["groups"]:
                qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).flatten(0, 1))
            out = torch.cat(outs)[torch.argsort(torch.cat([idx.reshape(-1) for idx in seg["groups"]]))]
        return self.out_proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):  # pre-LN
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, seg):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, seg)
        return x + self.mlp(self.layer_norm2(x))


class VisionModel(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = nn.Module()  # a bare container, so that the keys read encoder.layers.{l}
        self.encoder.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # in the checkpoint, unused
        self.gradient_checkpointing = False

    def rotary_angles(self, grid_thws: torch.Tensor, device) -> torch.Tensor:
        """(N, head_dim/2): [row * inv_freq, col * inv_freq] per patch, row/col within its frame, block order."""
        dim = self.cfg.hidden_size // self.cfg.num_attention_heads // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        out = []
        for t, h, w in grid_thws.tolist():
            rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            rc = _block_order(torch.stack([rows, cols], -1), self.cfg.hidden_stride).float()  # (h*w, 2)
            out.append((rc[:, :, None] * inv_freq).flatten(1).repeat(t, 1))  # [row * inv_freq, col * inv_freq]
        return torch.cat(out)

    def segment_ids(self, grid_thws: torch.Tensor, windowed: bool, device) -> torch.Tensor:
        """One id per patch: its window within its frame. Windows tile the merged grid from the top-left in m x m
        cells, m = window_size // hidden_stride // ps; full attention (not windowed): one window the whole frame."""
        hs = self.cfg.hidden_stride
        ids, offset = [], 0
        for t, h, w in grid_thws.tolist():
            m = max(1, self.cfg.window_size // hs // self.cfg.patch_size) if windowed else max(h, w)
            r = torch.arange(h // hs, device=device)[:, None] // m
            c = torch.arange(w // hs, device=device)[None, :] // m
            win = (r * (-(-(w // hs) // m)) + c).reshape(-1).repeat_interleave(hs * hs)  # (h*w,) block order
            n_win = int(win.max()) + 1
            for _ in range(t):  # frames never attend to each other
                ids.append(win + offset)
                offset += n_win
        return torch.cat(ids)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        """All images/frames as one packed sequence: (N, 3*ps*ps) -> (N, D), the last layer before post_layernorm."""
        x = self.embeddings(pixel_values, grid_thws)
        cos = sin = None
        if self.cfg.use_rope:
            emb = self.rotary_angles(grid_thws, x.device).repeat(1, 2)[:, None]  # (N, 1, head_dim)
            cos, sin = emb.cos(), emb.sin()
        full_at = self.cfg.fullatt_block_indexes
        full = _segments(self.segment_ids(grid_thws, False, x.device))
        win = None if full_at is None else _segments(self.segment_ids(grid_thws, True, x.device))
        for i, layer in enumerate(self.encoder.layers):
            seg = full if full_at is None or i in full_at else win
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, seg, use_reentrant=False)
            else:
                x = layer(x, cos, sin, seg)
        return x


class VisualTokenizer(nn.Module):
    """ViT -> 2x2 merge -> head (Linear without bias, LayerNorm eps 1e-5) -> softmax over V-4 visual words."""

    def __init__(self, cfg: OvisConfig):
        super().__init__()
        v = cfg.vit
        self.hidden_stride = v.hidden_stride
        self.vit = nn.Module()  # a bare container (Siglip2Navit), so that the keys read vit.vision_model.*
        self.vit.vision_model = VisionModel(v)
        words = cfg.visual_vocab_size - len(INDICATOR_IDS)  # the vte rows images can produce
        self.head = nn.Sequential(nn.Linear(v.hidden_size * v.hidden_stride ** 2, words, bias=False),
                                  nn.LayerNorm(words))  # eps 1e-5, unlike the ViT's 1e-6

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        x = self.vit.vision_model(pixel_values, grid_thws)  # (N, D)
        x = x.reshape(-1, x.shape[-1] * self.hidden_stride ** 2)  # (N/4, 4D): a 2x2 block's patches side by side
        probs = torch.softmax(self.head(x).float(), dim=-1).to(x.dtype)  # (N/4, V-4)
        return F.pad(probs, (0, len(INDICATOR_IDS)))  # (N/4, V): indicator slots are never produced by images


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint reading (shared by from_pretrained and the ZeRO-3 loader of the training scripts)


def read_config(path: str) -> "OvisConfig":
    """A checkpoint dir's config.json, parsed once per run: the data path (geometry) and the model build share it."""
    with open(os.path.join(path, "config.json")) as f:
        return OvisConfig.from_dict(json.load(f))


def iter_checkpoint(path: str):
    """Yields (key, tensor) of an official checkpoint one tensor at a time (memory-mapped, never all at once)."""
    from safetensors import safe_open

    index, files = os.path.join(path, "model.safetensors.index.json"), ["model.safetensors"]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif not os.path.exists(os.path.join(path, files[0])):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                                "checkpoints are supported)")
    for fn in files:
        with safe_open(os.path.join(path, fn), framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield k, f.get_tensor(k)


def load_weights(model: nn.Module, path: str, copy=None) -> set:
    """Copy checkpoint tensors into `model`'s parameters by official key name; returns the loaded keys. `copy(param,
    tensor)` replaces the plain copy, e.g. to write into ZeRO-3 partitioned parameters under GatheredParameters."""
    params = dict(model.named_parameters())
    loaded = set()
    for k, t in iter_checkpoint(path):
        if k not in params:
            raise ValueError(f"{path}: unexpected tensor {k!r} (not an Ovis2.5 checkpoint, or another config?)")
        p = params[k]
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the config gives {shape}")
        with torch.no_grad():
            copy(p, t) if copy is not None else p.copy_(t)
        loaded.add(k)
    return loaded


def load_for_training(path: str, config: "OvisConfig", ds_config: dict, rank: int, init_random: bool = False,
                      attn_implementation: str | None = None) -> "Ovis25":
    """The model a stage script trains. Under ZeRO-3 it is built partitioned (deepspeed.zero.Init) and filled tensor
    by tensor from rank 0, so no rank ever holds a full replica; otherwise a plain load. init_random: random weights
    of `config` (demos, tests). `path`: a local checkpoint dir, whose tokenizer and code files exports copy."""
    if ds_config["zero_optimization"].get("stage", 0) == 3:
        import deepspeed

        # zero.Init skips the Qwen3 init: a random model is built plainly (tiny ones) and copied in
        src = Ovis25(config, attn_implementation).state_dict() if init_random else None
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            m = Ovis25(config, attn_implementation)

        def copy(p, t):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(t)
        if src is not None:
            for name, p in m.named_parameters():
                copy(p, src[name])
        else:
            load_weights(m, path, copy)
    elif init_random:
        m = Ovis25.from_config(config, attn_implementation=attn_implementation)
    else:
        m = Ovis25.from_pretrained(path, attn_implementation=attn_implementation)
    m.source_dir = os.path.abspath(path)
    return m


# ----------------------------------------------------------------------------------------------------------------
# Ovis2.5: visual tokens merged into a plain transformers Qwen3ForCausalLM


@dataclass
class OvisOutput:
    loss: torch.Tensor | None = None  # mean (or sum) token cross-entropy over target tokens
    logits: torch.Tensor | None = None  # (B, T, vocab), only when no labels are given
    n_targets: int = 0  # number of target tokens behind `loss`


@dataclass
class GenState:
    """What `generate(..., return_state=True)` leaves for the next call: its cache holds every token but `pending`."""
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # (B, S) 1 where the cached position is a real token, 0 for padding
    pending: torch.Tensor  # (B,) last sampled token, not yet in the cache
    pending_real: torch.Tensor  # (B,) bool: pending is a real token (its row was still running)
    seen: torch.Tensor | None  # (B, vocab) bool: tokens seen so far, for the repetition penalty
    n_generated: torch.Tensor  # (B,) tokens generated so far across calls (thinking budget)
    think_closed: torch.Tensor  # (B,) bool: </think> already produced or forced
    force_pos: torch.Tensor  # (B,) next index into THINK_EARLY_STOP_IDS while forcing it, else -1

    def keep(self, rows: list[int]):
        """Only these rows go on (finished ones leave the batch and the cache)."""
        idx = torch.tensor(rows, device=self.pending.device)
        self.cache.batch_select_indices(idx)
        for k in ("mask", "pending", "pending_real", "seen", "n_generated", "think_closed", "force_pos"):
            setattr(self, k, None if getattr(self, k) is None else getattr(self, k)[idx])


def _held(w: torch.Tensor) -> torch.Tensor:
    """A gathered copy of a frozen ZeRO-3 weight used outside its module's forward or across checkpointed chunks (no
    gradient hook would fetch it back for the backward); any other weight as is. A collective: same calls per rank."""
    if hasattr(w, "ds_id") and not w.requires_grad and torch.is_grad_enabled():
        import deepspeed

        # already gathered (small persistent weights, or active in the running module): only copy
        with deepspeed.zero.GatheredParameters([w], enabled=w.ds_status.name != "AVAILABLE"):
            return w.detach().clone()
    return w


class Ovis25(nn.Module):
    loss_chunk_size = 1024  # target tokens per cross-entropy chunk: (chunk, vocab) fp32 logits live at a time

    def __init__(self, config: OvisConfig, attn_implementation: str | None = None):
        super().__init__()
        self.config = config
        self.source_dir = None  # checkpoint dir we were loaded from: its tokenizer/processor files are saved along
        self.attn = attn_implementation or ""  # see attention_paths: "" = the best kernel the hardware allows
        llm = attention_paths(self.attn, "cpu", torch.float32)["generation"]  # (validates the name)
        if llm == "sdpa" and self.attn in ("", "varlen"):  # ours: varlen for packed rows on CUDA, else SDPA
            from transformers import AttentionInterface, AttentionMaskInterface
            AttentionInterface.register(llm := "ovis_varlen", _llm_varlen_attention)
            AttentionMaskInterface.register(llm, _llm_varlen_mask)
        config.llm._attn_implementation = llm
        self.visual_tokenizer = VisualTokenizer(config)
        self.vte = nn.Embedding(config.visual_vocab_size, config.hidden_size)
        self.llm = Qwen3ForCausalLM(config.llm)
        self._tie()
        for m in self.visual_tokenizer.modules():
            if isinstance(m, VisionAttention):
                m.attn = self.attn

    def _tie(self):
        if self.config.llm.tie_word_embeddings:
            self.llm.lm_head.weight = self.llm.model.embed_tokens.weight

    # -- inputs -----------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, pixel_values=None, grid_thws=None) -> torch.Tensor:
        """(B, T) ids with placeholders -> (B, T, H) LLM input embeddings. Visual atoms (-300) are filled in
        row-major order over (batch, sequence) with the visual embeddings of all images, in order."""
        x = self.llm.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, H); placeholder rows overwritten below
        is_atom = input_ids == VISUAL_ATOM_ID
        n_atoms = int(is_atom.sum())
        if pixel_values is not None:
            tokens = self.visual_tokenizer(pixel_values, grid_thws)  # (n_atoms, V)
            if tokens.shape[0] != n_atoms:
                raise ValueError(f"{n_atoms} visual atom ids (-300) but the images give {tokens.shape[0]} tokens")
            vis = (tokens @ _held(self.vte.weight)).to(x.dtype)  # soft lookup: (n_atoms, H)
            x = x.masked_scatter(is_atom[..., None], vis)
        elif n_atoms:
            raise ValueError("input_ids contain visual atom ids (-300) but no pixel_values were given")
        elif self.training or (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            # Keep the ViT, head and vte in every rank's graph even without images: ZeRO-3 gathers parameters
            # module by module and hangs if one rank skips the ViT. Zero-weighted, so the loss is unchanged.
            dummy = torch.zeros(4, 3 * self.config.vit.patch_size ** 2, device=x.device)  # one 2x2 block
            tok = self.visual_tokenizer(dummy, torch.tensor([[1, 2, 2]], device=x.device))
            x = x + 0.0 * (tok @ _held(self.vte.weight)).sum().to(x.dtype)
        is_ind = input_ids <= INDICATOR_IDS[0]
        if bool(is_ind.any()):  # -301..-304 -> the last four vte rows
            rows = self.config.visual_vocab_size - 305 - input_ids[is_ind]
            x = x.masked_scatter(is_ind[..., None], self.vte(rows).to(x.dtype))
        return x

    # -- training / scoring forward -----------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, pixel_values=None, grid_thws=None, labels=None,
                position_ids=None, loss_reduction: str = "mean", temperature: float = 1.0) -> OvisOutput:
        """Packed rows: `position_ids` restarting at 0 for each sample and no attention_mask (attention never crosses
        samples). Labels unshifted (HF); with labels, `.logits` is None and the loss is a chunked cross-entropy of the
        logits / temperature, per target token with loss_reduction "none" (minus the log-probs, GRPO)."""
        x = self.embed(input_ids, pixel_values, grid_thws)
        kw = dict(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if labels is None:
            return OvisOutput(logits=self.llm(**kw).logits)
        h = self.llm.model(**kw).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:].clone()  # position t predicts token t+1
        if position_ids is not None:  # the last token of one packed sample must not predict the next sample
            targets[position_ids[:, 1:] == 0] = IGNORE_ID
        keep = targets != IGNORE_ID
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        loss, n = self.chunked_ce(h[:, :-1][keep] / temperature if temperature != 1 else h[:, :-1][keep],
                                  targets[keep], loss_reduction == "none")
        return OvisOutput(loss=loss / max(n, 1) if loss_reduction == "mean" else loss, n_targets=n)

    def chunked_ce(self, h: torch.Tensor, targets: torch.Tensor, per_token: bool = False):
        """Cross-entropy of (n, H) hidden states against (n,) targets: the sum (per_token: the (n,) losses, minus the
        log-probs GRPO needs) and n. Each `loss_chunk_size` chunk's fp32 logits are recomputed in backward, never all
        kept. lm_head runs as a module (ZeRO-3 hooks gather it), a frozen ZeRO-3 weight as one gathered copy (_held)."""
        w = _held(self.llm.lm_head.weight)
        head = self.llm.lm_head if w is self.llm.lm_head.weight else (lambda x: F.linear(x, w))

        def ce(hc, tc):
            return F.cross_entropy(head(hc).float(), tc, reduction="none" if per_token else "sum")

        parts = [h.new_zeros((0,) if per_token else (), dtype=torch.float32) + 0.0 * h.sum()]  # graph alive at n=0
        for i in range(0, h.shape[0], self.loss_chunk_size):
            hc, tc = h[i:i + self.loss_chunk_size], targets[i:i + self.loss_chunk_size]
            parts.append(torch.utils.checkpoint.checkpoint(ce, hc, tc, use_reentrant=False)
                         if torch.is_grad_enabled() else ce(hc, tc))
        return torch.cat(parts) if per_token else sum(parts), int(targets.numel())

    def gradient_checkpointing_enable(self):
        self.visual_tokenizer.vit.vision_model.gradient_checkpointing = True
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- generation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, grid_thws=None, max_new_tokens: int = 1024,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, eos_token_ids=EOS_IDS, stop_token_ids=(),
                 thinking_budget: int | None = None, state: GenState | None = None, return_state: bool = False,
                 generator: torch.Generator | None = None, repeat: int = 1, on_step=None):
        """Batched decoding with a KV cache: left-padded (B, L) `input_ids` -> the new tokens (B, n), PAD_ID after a
        row finished (its eos or stop id included). thinking_budget: a row that generated that many tokens without
        `</think>` gets THINK_EARLY_STOP_IDS forced, then goes on (spec 10.2); a fresh call shrinks it to fit
        max_new_tokens; counts carry over with `state`. state: continue a previous call (return_state=True) from new
        tokens only (text + image placeholders, left-padded); nothing before is re-encoded. repeat: each input row
        continues as `repeat` rows (GRPO's group; its prefix encoded once, the KV cache copied), row-major.
        on_step(tokens (B,), running (B,)) -> (B,) bool or None: sees each step's tokens (a server streams them) and
        may end rows at once (a client that left)."""
        dev, ids = input_ids.device, input_ids
        if state is None:
            n = ids.shape[0]
            st = GenState(cache=DynamicCache(config=self.llm.config), mask=ids.new_zeros(n, 0), pending=None,
                          pending_real=None, seen=None, n_generated=ids.new_zeros(n),
                          think_closed=ids.new_zeros(n, dtype=torch.bool), force_pos=ids.new_full((n,), -1))
            real = ids != PAD_ID
        else:
            st = state
            ids = torch.cat([st.pending[:, None], ids], 1)
            real = torch.cat([st.pending_real[:, None], input_ids != PAD_ID], 1)
        if repetition_penalty != 1.0:
            if st.seen is None:
                st.seen = torch.zeros(ids.shape[0], self.llm.config.vocab_size, dtype=torch.bool, device=dev)
            text = real & (ids >= 0)
            st.seen.scatter_(1, torch.where(text, ids, 0), text)
        x = self.embed(ids, pixel_values, grid_thws)
        st.mask = torch.cat([st.mask, real.long()], 1)
        logits = self._last_logits(x, st)  # the prefill: (B, vocab)
        if repeat > 1:  # copy each row's cache and state `repeat` times: the prefix is encoded once
            st.cache.batch_repeat_interleave(repeat)
            for k in ("mask", "seen", "n_generated", "think_closed", "force_pos"):
                v = getattr(st, k)
                setattr(st, k, None if v is None else v.repeat_interleave(repeat, 0))
            logits = logits.repeat_interleave(repeat, 0)
        b = logits.shape[0]
        ends = torch.tensor([*eos_token_ids, *stop_token_ids], device=dev)
        forced = torch.tensor(THINK_EARLY_STOP_IDS, device=dev)
        budget = thinking_budget  # counted per row across calls; forcing resumes in the next call if cut
        if budget is not None and state is None:  # one-shot call: shrink so the forced text and an answer still fit
            budget = max(0, min(budget, max_new_tokens - len(THINK_EARLY_STOP_IDS) - 1))
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        new = []
        for step in range(max_new_tokens):
            if step:
                logits = self._last_logits(x, st)  # (B, vocab)
            tok = self._next_token(logits, st.seen, do_sample, temperature, top_p, top_k, repetition_penalty, generator)
            if budget is not None:  # per-row thinking budget: start forcing, then emit the forced text
                fp = torch.where((st.n_generated >= budget) & ~st.think_closed & (st.force_pos < 0), 0, st.force_pos)
                forcing = (fp >= 0) & ~finished
                tok = torch.where(forcing, forced[fp.clamp(min=0, max=len(forced) - 1)], tok)
                fp = torch.where(forcing, fp + 1, fp)
                st.force_pos = torch.where(fp >= len(forced), -1, fp)
            tok = torch.where(finished, PAD_ID, tok)
            was_running = ~finished
            st.n_generated += was_running.long()
            st.think_closed |= was_running & (tok == THINK_END_ID)
            if st.seen is not None:
                st.seen[torch.arange(b, device=dev), tok] |= was_running
            new.append(tok)
            finished = finished | torch.isin(tok, ends)
            finished = finished if on_step is None else finished | on_step(tok, was_running)
            st.pending, st.pending_real = tok, was_running
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            x = self.llm.get_input_embeddings()(tok[:, None])  # (B, 1, H)
            st.mask = torch.cat([st.mask, was_running.long()[:, None]], 1)
        out = torch.stack(new, 1) if new else ids.new_zeros(b, 0)
        return (out, st) if return_state else out

    def _last_logits(self, x: torch.Tensor, st: GenState) -> torch.Tensor:
        """(B, T, H) new input embeddings -> (B, vocab) fp32 logits at the last position; the cache grows by T."""
        pos = (st.mask.cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
        kw = {CACHE_KW: st.cache}  # the KV cache, under the name this transformers version takes
        return self.llm(inputs_embeds=x, attention_mask=st.mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **kw).logits[:, -1].float()

    @staticmethod
    def _next_token(logits, seen, do_sample, temperature, top_p, top_k, repetition_penalty, generator):
        if seen is not None and repetition_penalty != 1.0:  # HF rule: shrink logits of tokens already present
            pen = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, pen, logits)
        if not do_sample:
            return logits.argmax(-1)
        logits = logits / max(temperature, 1e-5)
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:  # keep the smallest set of tokens whose probability mass reaches top_p
            sorted_logits, idx = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= top_p
            logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
        probs = logits.softmax(-1)
        if not torch.isfinite(probs).all():  # torch.multinomial would fail with a message that names no cause
            raise FloatingPointError("generate: the model's next-token logits are not finite (diverged weights?)")
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # -- checkpoints ----------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: "OvisConfig | dict", dtype=torch.float32, device="cpu",
                    attn_implementation: str | None = None) -> "Ovis25":
        """Randomly initialised model (tests, demos): Qwen3 init for the LLM, PyTorch defaults elsewhere."""
        cfg = config if isinstance(config, OvisConfig) else OvisConfig.from_dict(config)
        return cls(cfg, attn_implementation).to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu",
                        attn_implementation: str | None = None) -> "Ovis25":
        """Official checkpoint dir (config.json + model.safetensors or a sharded index) or Hub id. Built on the meta
        device and filled from the files, so a 9B model never holds two copies of its weights."""
        path = hub.resolve_checkpoint(path)
        cfg = read_config(path)
        with torch.device("meta"):
            model = cls(cfg, attn_implementation)
        model = model.to(dtype=dtype).to_empty(device=device)
        loaded = load_weights(model, path)
        model._tie()
        missing = set(dict(model.named_parameters()).keys()) - loaded
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)[:5]} ({len(missing)} in all)")
        rot = model.llm.model.rotary_emb  # rebuilt: to_empty left its non-persistent inv_freq buffer uninitialised
        model.llm.model.rotary_emb = type(rot)(config=cfg.llm).to(device)
        model.source_dir = os.path.abspath(path)
        return model

    def save_pretrained(self, out_dir: str, state_dict: dict | None = None, dtype=None, max_shard_bytes: int = 5 << 30,
                        source_dir: str | None = None, record: dict | None = None):
        """Official layout: config.json (OvisConfig.to_dict), model.safetensors or shards + index (no lm_head when tied)
        and the AUX_FILES of `source_dir` (default: where we were loaded from), via a temp dir renamed at the end (a
        crash never leaves half a checkpoint). ZeRO-3: pass state_dict=engine._zero3_consolidated_16bit_state_dict().
        `record`: the training record (common.RECORD_FILE, ignored by the official code) in place of the source's."""
        from safetensors.torch import save_file

        sd = state_dict if state_dict is not None else self.state_dict()
        tied = self.config.llm.tie_word_embeddings
        sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()
              if not (tied and k == "llm.lm_head.weight")}
        out_dir = os.path.abspath(out_dir)
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for v in sd.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:  # the source's JSON, only torch_dtype updated
            json.dump(self.config.to_dict(dtype=next(iter(sd.values())).dtype), f, indent=2)
            f.write("\n")
        src = source_dir or self.source_dir
        for name in sorted(os.listdir(src)) if src else ():
            if name != "config.json" and any(fnmatch.fnmatch(name, p) for p in AUX_FILES):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))  # follows hub-cache symlinks
        if record is not None:
            with open(os.path.join(tmp, common.RECORD_FILE), "w") as f:
                json.dump(record, f, indent=2)
        if os.path.exists(out_dir):  # swap in the new dir, then drop the old one
            os.replace(out_dir, out_dir + ".old")
            os.replace(tmp, out_dir)
            shutil.rmtree(out_dir + ".old")
        else:
            os.replace(tmp, out_dir)
