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

import json
import math
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

try:  # optional GPU kernel; never required
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# ----------------------------------------------------------------------------------------------------------------
# Constants of the released models

IGNORE_ID = -100
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = -200, -201  # `<image>` / `<video>` placeholders in tokenized text
VISUAL_ATOM_ID = -300  # one per 2x2 patch block, replaced by a soft visual embedding
INDICATOR_IDS = (-301, -302, -303, -304)  # image start/end, video start/end: the last 4 rows of vte
PAD_ID, IM_END_ID, THINK_END_ID = 151643, 151645, 151668  # <|endoftext|>, <|im_end|>, </think>
EOS_IDS = (IM_END_ID, PAD_ID)  # generation_config.json of the released checkpoints
# "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.
# \n</think>\n\n" tokenized: forced when the thinking budget runs out (spec 10.2)
THINK_EARLY_STOP_IDS = (271, 82796, 279, 7199, 882, 553, 279, 1196, 11, 358, 614, 311, 2968, 279, 6291, 3118, 389,
                        279, 7274, 5961, 1431, 624, 151668, 271)
# files of a checkpoint directory that are not weights: copied along by save_pretrained
AUX_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
             "special_tokens_map.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
             "generation_config.json", "configuration_ovis2_5.py", "modeling_ovis2_5.py")

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


@dataclass
class OvisConfig:
    vit: ViTConfig
    llm: object  # transformers.Qwen3Config
    hidden_size: int = 4096
    visual_vocab_size: int = 65536
    raw: dict = field(default_factory=dict)  # the config.json as read, so unknown fields survive a save

    @classmethod
    def from_dict(cls, d: dict) -> "OvisConfig":
        from transformers import Qwen3Config

        v = dict(d.get("vit_config") or {})
        fb = v.get("fullatt_block_indexes")
        if isinstance(fb, str):  # the official form: "7|15|23"
            fb = [int(x) for x in fb.split("|") if x.strip() != ""]
        elif fb is not None:
            fb = [int(x) for x in fb]
        v["fullatt_block_indexes"] = fb
        known = ViTConfig.__dataclass_fields__
        vit = ViTConfig(**{k: val for k, val in v.items() if k in known})
        if vit.temporal_patch_size != 1:
            raise ValueError("temporal_patch_size != 1 cannot work with the Conv2d patch embedding (spec 13.6)")
        llm_d = {k: val for k, val in (d.get("llm_config") or {}).items() if k not in ("architectures",)}
        llm = Qwen3Config(**llm_d)
        llm.tie_word_embeddings = bool(llm_d.get("tie_word_embeddings", False))
        hidden = int(d.get("hidden_size", llm.hidden_size))
        if hidden != llm.hidden_size:
            raise ValueError(f"config hidden_size {hidden} != llm_config.hidden_size {llm.hidden_size}")
        return cls(vit=vit, llm=llm, hidden_size=hidden, visual_vocab_size=int(d.get("visual_vocab_size", 65536)),
                   raw=dict(d))

    def to_dict(self) -> dict:
        d = dict(self.raw)
        vit = dict(d.get("vit_config") or {})
        vit.update({k: getattr(self.vit, k) for k in ViTConfig.__dataclass_fields__})
        fb = self.vit.fullatt_block_indexes
        vit["fullatt_block_indexes"] = None if fb is None else "|".join(str(i) for i in fb)
        vit.setdefault("model_type", "siglip2_navit")
        llm = self.llm.to_dict()
        for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"):
            llm.pop(k, None)
        llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                   tie_word_embeddings=bool(self.llm.tie_word_embeddings))
        d.update(vit_config=vit, llm_config=llm, hidden_size=self.hidden_size,
                 visual_vocab_size=self.visual_vocab_size, model_type="ovis2_5", architectures=["Ovis2_5"],
                 auto_map={"AutoConfig": "configuration_ovis2_5.Ovis2_5_Config",
                           "AutoModelForCausalLM": "modeling_ovis2_5.Ovis2_5"})
        d.setdefault("conversation_formatter_class", "Qwen3ConversationFormatter")
        return d


# ----------------------------------------------------------------------------------------------------------------
# Image / video preprocessing (spec 4): bit-exact with the official SigLIP processor path under pillow<13


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The official resize rule: both sides multiples of `factor`, area within [min_pixels, max_pixels].
    Python's round() is banker's rounding, as in the official code. Raises ValueError where the official code
    would return a 0-pixel side or divide by zero."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if height < factor or width < factor:  # scale the short side up to `factor`; the aspect clamp is skipped
        if height < width:
            width, height = round(factor / height * width), factor
        else:
            height, width = round(factor / width * height), factor
    elif max(height, width) / min(height, width) > 200:
        if height > width:
            height = 200 * width
        else:
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
    """PIL image -> (3, H, W) float32 in [-1, 1], as SiglipImageProcessor does (uint8 bilinear resize in Pillow,
    float64 rescale by 1/255, float32 normalise with mean = std = 0.5)."""
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
    """One PIL image -> (pixel_values (N, 3*ps*ps) float32, grid_thws (1, 3) int64)."""
    factor = patch_size * hidden_stride
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    return _patchify(_to_array(image, h, w)[None], patch_size, hidden_stride, temporal_patch_size)


def preprocess_video(frames: list, min_pixels: int = 448 * 448, max_pixels: int = 896 * 896,
                     patch_size: int = 16, hidden_stride: int = 2, temporal_patch_size: int = 1):
    """A list of PIL frames -> one grid [T, h, w]; every frame is resized to the first frame's target size."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    factor = patch_size * hidden_stride
    h, w = smart_resize(frames[0].height, frames[0].width, factor, min_pixels, max_pixels)
    arr = np.stack([_to_array(f, h, w) for f in frames])
    return _patchify(arr, patch_size, hidden_stride, temporal_patch_size)


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
