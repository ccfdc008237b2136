"""The tools the model may call while it thinks (Crop returns an image, Identify a text, yours: `load_tools`), the
tool loop of inference and GRPO rollouts (`run_tool_loop`), and the scoring of a trajectory (`SCORERS`).

Call convention (spec 14, the seed's format): `<tool_call>Crop [x1, y1, x2, y2]</tool_call>` in the model's own turn
(or the Qwen3 JSON form); the result follows as one image's visual tokens or `<tool_response>text</tool_response>`,
rendered once (`tool_result_ids`, `tool_result_pixels`) for training and inference alike. Every tool: a failure is a
result the model reads (`ToolResult(text="Error: ...", error=True)`), never an exception; only the conversation's
images are read, never a path from model text; boxes are on the ORIGINAL first image, in the registry's `bbox_format`:
`pixel` (seed data, default), `norm` ([0, 1], Ovis) or `norm1000` ([0, 1000]).
"""

import inspect
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

import common
import model as ovis

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # complete calls in a text
_NAME_RE = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*(.*)", re.DOTALL)
_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
BBOX_FORMATS = ("pixel", "norm", "norm1000")
_FMT_DOC = {"pixel": "pixels of the original image, x1,y1 = top-left, x2,y2 = bottom-right",  # for tool descriptions
            "norm": "fractions of the image width/height in [0, 1], x1,y1 = top-left, x2,y2 = bottom-right",
            "norm1000": "integers 0-1000 relative to the image width/height, x1,y1 = top-left, x2,y2 = bottom-right"}
MIN_CROP_SIDE = 32  # = patch 16 x merge stride 2, the resize factor: smaller crops carry < 1 visual token a side
CROP_MIN_PIXELS, CROP_MAX_PIXELS = 448 * 448, 896 * 896  # tool crops: small crops are upscaled to min_pixels


@dataclass
class ToolCall:
    """A parsed call: `args` = the numbers (bracket form) or JSON `arguments`; `error`: why the text did not parse."""
    name: str = ""
    args: object = None
    raw: str = ""
    error: str | None = None


@dataclass
class ToolResult:
    """What a tool returns: an image (Crop) or a text (Identify, every error)."""
    name: str
    text: str | None = None
    image: Image.Image | None = None
    error: bool = False

    @property
    def kind(self) -> str:
        return "image" if self.image is not None else "text"


def safe_text(s: str) -> str:
    """`<`, `>` become look-alike guillemets: tool text in a <tool_response> must not forge `<|im_end|>` or such."""
    return str(s).replace("<", "\u2039").replace(">", "\u203a")


def tool_result_ids(result: ToolResult, tokenizer) -> list[int]:
    """Ids after `</tool_call>`, never learned: `<image>` (grid: tool_result_pixels) or `<tool_response>...`."""
    if result.kind == "image":
        return [ovis.IMAGE_TOKEN_ID]
    text = f"<tool_response>{safe_text(result.text)}</tool_response>"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_result_pixels(result: ToolResult, crop_min_pixels: int = CROP_MIN_PIXELS,
                       crop_max_pixels: int = CROP_MAX_PIXELS, patch_size: int = 16, hidden_stride: int = 2):
    """Pixels of a tool result: (pixel_values (N, 3*ps*ps), grid_thws (1, 3)) for a crop, (None, None) for text."""
    if result.kind != "image":
        return None, None
    return ovis.preprocess_image(result.image, crop_min_pixels, crop_max_pixels, patch_size, hidden_stride)


def _err(name: str, why: str) -> ToolResult:
    return ToolResult(name=name, text=safe_text(f"Error: {why}"), error=True)


# ----------------------------------------------------------------------------------------------------------------
# Reading what the model wrote: tool calls (tolerant: never raises) and their boxes

def parse_tool_call(text: str) -> ToolCall:
    """Any text -> a ToolCall: `Name [a, b, c, d]` (commas, brackets optional) or JSON; the last call in it counts."""
    try:
        raw = str(text).rsplit("<tool_call>", 1)[-1].split("</tool_call>", 1)[0]
        body = raw.strip()
        if body.startswith("{"):
            try:
                obj = json.loads(body)
            except ValueError as e:
                return ToolCall(raw=raw, error=f"tool call is not valid JSON ({e.msg})")
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return ToolCall(raw=raw, error='JSON tool call needs a string "name"')
            return ToolCall(name=obj["name"].strip(), args=obj.get("arguments", obj.get("parameters")), raw=raw)
        m = _NAME_RE.fullmatch(body)
        if m is None:
            return ToolCall(raw=raw, error="no tool name; write <tool_call>Name [x1, y1, x2, y2]</tool_call>")
        name, rest = m.group(1), m.group(2).strip()
        inner = (rest[1:-1] if len(rest) >= 2 and rest[0] + rest[-1] in ("[]", "()") else rest).strip()
        parts = [p for p in re.split(r"[\s,]+", inner) if p]
        if not all(_NUM_RE.fullmatch(p) for p in parts):
            return ToolCall(name=name, raw=raw, error=f"arguments of {name} must be numbers, got [{inner}]")
        return ToolCall(name=name, args=[float(p) for p in parts], raw=raw)
    except Exception as e:  # pragma: no cover - belt and braces: parsing must never take the loop down
        return ToolCall(raw="", error=f"unparsable tool call ({type(e).__name__})")


def bbox_args(args) -> list[float]:
    """Accept [x1, y1, x2, y2] or a JSON dict holding it under bbox / bbox_2d / box; raise ValueError otherwise."""
    if isinstance(args, str):  # OpenAI-style JSON arguments given as a string
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError("arguments are not valid JSON") from None
    if isinstance(args, dict):
        args = next((args[k] for k in ("bbox", "bbox_2d", "box") if k in args), None)
    if not isinstance(args, (list, tuple)) or len(args) != 4:
        raise ValueError("a box needs exactly 4 numbers [x1, y1, x2, y2]")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args):
        raise ValueError("box values must be finite numbers")
    return [float(v) for v in args]


def to_pixels(box, size: tuple[int, int], bbox_format: str = "pixel") -> list[float]:
    """Box in `bbox_format` -> float pixel box of an image of `size` = (W, H), corners put in order (no clamping)."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    x1, y1, x2, y2 = bbox_args(box)
    if bbox_format != "pixel":
        sx, sy = (size[0], size[1]) if bbox_format == "norm" else (size[0] / 1000, size[1] / 1000)
        x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def crop_box(box, size: tuple[int, int], bbox_format: str = "pixel",
             min_side: int = MIN_CROP_SIDE) -> tuple[int, int, int, int]:
    """The pixel box Crop cuts: ordered, clamped, rounded outwards, grown to `min_side` a side; ValueError if empty."""
    W, H = size
    x1, y1, x2, y2 = to_pixels(box, size, bbox_format)
    spans = []
    for a, b, limit in ((x1, x2, W), (y1, y2, H)):
        a, b = min(max(a, 0.0), limit), min(max(b, 0.0), limit)
        if b - a <= 0:
            raise ValueError(f"box {[round(v, 2) for v in bbox_args(box)]} has zero area inside the {W}x{H} image")
        a, b = math.floor(a), math.ceil(b)
        side = min(min_side, limit)
        if b - a < side:  # grown around its centre, shifted back inside the image (never beyond it)
            a = min(max(round((a + b) / 2 - side / 2), 0), limit - side)
            b = a + side
        spans.append((a, b))
    (x1, x2), (y1, y2) = spans
    return x1, y1, x2, y2


# ----------------------------------------------------------------------------------------------------------------
# Tools and registry

class Tool:
    """A tool the model may call: `run(args, images, keys)` gets the conversation's original images and their names."""
    name = ""
    returns = "text"  # "text": a <tool_response> (in training data: the recorded one), "image": run at load like Crop
    description = ""  # its line of the default system prompt

    def run(self, args, images: list, keys: list) -> ToolResult:
        raise NotImplementedError

    def output_size(self, args, size: tuple[int, int]) -> tuple[int, int] | None:
        """(W, H) of the result given the first image's (W, H), so the length pass need not decode; None: run it."""
        return None


@dataclass
class Crop(Tool):
    bbox_format: str = "pixel"
    min_side: int = MIN_CROP_SIDE
    name, returns = "Crop", "image"

    @property
    def description(self) -> str:
        return ("Crop [x1, y1, x2, y2]: zoom into a region of the image; the cropped region is shown to you right "
                f"after the call. Coordinates: {_FMT_DOC[self.bbox_format]}.")

    def output_size(self, args, size: tuple[int, int]) -> tuple[int, int]:
        x1, y1, x2, y2 = crop_box(args, size, self.bbox_format, self.min_side)
        return x2 - x1, y2 - y1

    def run(self, args, images: list, keys: list) -> ToolResult:
        if not images:
            return _err(self.name, "there is no image to crop in this conversation")
        box = crop_box(args, images[0].size, self.bbox_format, self.min_side)
        return ToolResult(name=self.name, image=images[0].crop(box))


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Identify(Tool):
    """Names what a box holds via `backend`; from a map (boxes in bbox_format) the best IoU wins, none: "unknown"."""
    backend: object = None  # JSON map file or dict {image_key: [{"bbox": [...], "name": ...}]}, or fn(image, box, key)
    bbox_format: str = "pixel"
    name = "Identify"
    table: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.table = self.backend if isinstance(self.backend, dict) else {}
        if isinstance(self.backend, str):
            with open(self.backend) as f:
                self.table = json.load(f)

    @property
    def description(self) -> str:
        return ("Identify [x1, y1, x2, y2]: name the person or object in a region; the answer comes back as "
                f"<tool_response>name</tool_response>. Coordinates: {_FMT_DOC[self.bbox_format]}.")

    def run(self, args, images: list, keys: list) -> ToolResult:
        if not images:
            return _err(self.name, "there is no image in this conversation")
        img, key = images[0], (keys[0] if keys else "")
        box = to_pixels(args, img.size, self.bbox_format)
        crop_box(args, img.size, self.bbox_format)  # same validation as Crop (zero area -> error)
        if callable(self.backend):
            return ToolResult(name=self.name, text=safe_text(self.backend(img, box, key)))
        entries = self.table.get(key) or self.table.get(str(key).rsplit("/", 1)[-1]) or []
        scored = [(iou(box, to_pixels(e["bbox"], img.size, self.bbox_format)), str(e["name"])) for e in entries]
        best = max(scored, default=(0.0, "unknown"), key=lambda x: x[0])
        return ToolResult(name=self.name, text=safe_text(best[1] if best[0] > 0 else "unknown"))


class Registry:
    """Name -> tool. `execute` turns any call (parsed or not) into a ToolResult and never raises."""

    def __init__(self, tools: list[Tool] = ()):
        self.tools: dict[str, Tool] = {t.name.lower(): t for t in tools}

    def get(self, name: str) -> Tool | None:
        return self.tools.get(str(name).lower())

    def system_prompt(self) -> str:
        return "\n".join(["You can use tools while you think. Call a tool by writing <tool_call>Name [x1, y1, x2, y2]"
                          "</tool_call>; its result appears right after the call. Available tools:",
                          *(f"- {t.description}" for t in self.tools.values()),
                          "After using the tools, give your final answer."])

    def execute(self, call: "ToolCall | str", images: list = (), keys: list = ()) -> ToolResult:
        """Run a call on the conversation's images. Bad calls, unknown tools and tool crashes become error results."""
        try:
            call = call if isinstance(call, ToolCall) else parse_tool_call(call)
            if call.error:
                return _err(call.name or "?", call.error)
            tool = self.get(call.name)
            if tool is None:
                return _err(call.name, f"unknown tool {call.name!r}; available: {', '.join(self.names())}")
            return tool.run(call.args, list(images), list(keys))
        except Exception as e:  # a tool failure is something the model reads, not a crash
            return _err(getattr(call, "name", "?") or "?", str(e) or type(e).__name__)

    def names(self) -> list[str]:
        return [t.name for t in self.tools.values()]


def load_tools(spec: str = "Crop|Identify", bbox_format: str = "pixel", identify=None) -> Registry:
    """"Crop|Identify|mypkg.ocr:OCR|tests.my_tools:Flip{"axis": 1}" -> a Registry: built-ins by name, others as
    module:Class (a Tool subclass), any with JSON kwargs; `bbox_format` goes where taken, `identify` to Identify."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    found, pos = [], 0
    while pos < len(spec.rstrip()):
        m = re.compile(r"\s*([\w.]+(?::\w+)?)\s*(\{.*?\})?\s*(\||$)").match(spec, pos)  # Name{json}|
        if not m:
            raise ValueError(f"tools: cannot read {spec[pos:]!r}; write Name, module:Class or Name{{json}}, |-apart")
        name, pos = m.group(1), m.end()
        try:
            kw = json.loads(m.group(2) or "{}")
        except ValueError as e:
            raise ValueError(f"tools: the keyword arguments of {name} are not a JSON object: {e}") from None
        cls = common.import_object(name, "tools") if ":" in name else {"crop": Crop, "identify": Identify}.get(
            name.lower())
        if not (isinstance(cls, type) and issubclass(cls, Tool)):
            raise ValueError(f"tools: {name!r} is not a built-in tool (Crop, Identify) nor a tools.Tool subclass")
        given = {"bbox_format": bbox_format, "backend": identify if cls is Identify else None}  # where a tool takes it
        kw = {k: v for k, v in given.items() if v is not None and k in inspect.signature(cls).parameters} | kw
        found.append(cls(**kw))
    return Registry(found)


# ----------------------------------------------------------------------------------------------------------------
# The tool loop (infer.py, GRPO rollouts): batched, each result appended as training renders it, KV continuation

NO_MORE_TOOLS = "Error: no more tool calls are available; give your final answer."  # calls after max_tool_calls


@dataclass
class Rollout:
    """One row: the prompt and all the model and the tools added after it."""
    text: str = ""  # the output after the prompt, tool results included (a crop reads `<image>`)
    thinking: str = ""
    answer: str = ""
    tool_calls: list = field(default_factory=list)  # {name, args, ok, result} per call
    crops: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)  # prompt + all after it, visual ids expanded
    gen_mask: list = field(default_factory=list)  # 1 iff sampled (0: prompt, tool results, forced thinking-budget text)
    prompt_len: int = 0
    pixel_values: object = None  # every image of token_ids in order (prompt's, then crops): one forward re-scores it
    grid_thws: object = None
    n_generated: int = 0
    finish: str = ""  # "eos" | "length"
    model_text: str = ""  # only the sampled tokens: a <tool_response> here was written by the model itself
    thinking_on: bool = False  # the prompt opened a thinking turn
    image_size: tuple | None = None  # (W, H) of the first image: what tool boxes refer to
    bbox_format: str = "pixel"  # of the tool boxes (the registry's Crop)


def split_output(text: str) -> tuple[str, str]:
    """(thinking: inside the first <think>...</think> or to the end, answer: <answer>...</answer> or all after it)."""
    head, closed, tail = text.partition("</think>")
    rest = tail if closed else ("" if "<think>" in head else text)
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", rest, re.DOTALL)
    return (head.split("<think>", 1)[1].strip() if "<think>" in head else ""), (m.group(1) if m else rest).strip()


def run_tool_loop(model, tokenizer, prompts: list, images: list | None = None, keys: list | None = None,
                  registry: "Registry | None" = None, max_tool_calls: int = 8, max_new_tokens: int = 1024,
                  thinking_budget: int | None = None, kv_cache: bool = True, crop_min_pixels: int | None = None,
                  crop_max_pixels: int | None = None, group: int = 1, **sampling) -> list[Rollout]:
    """Generate for model.build_inputs prompts, running tool calls as they come: a round decodes the running rows until
    `</tool_call>` or an eos; `registry` (None: no tools) runs each call on its row's `images` (`keys`: their names),
    the result is appended as training renders it. max_new_tokens / thinking_budget count a row's model tokens over
    all rounds; `group` rollouts per prompt (GRPO), row-major, as if each came `group` times; `sampling`: generate's."""
    if thinking_budget is not None and not kv_cache:
        raise ValueError("thinking_budget needs kv_cache=True (it counts tokens over all rounds)")
    vit, dev, forced = model.config.vit, next(model.parameters()).device, len(ovis.THINK_EARLY_STOP_IDS)
    images, keys = images or [[] for _ in prompts], keys or [[] for _ in prompts]
    prompts, images, keys = ([x for x in v for _ in range(group)] for v in (prompts, images, keys))
    crop_px = (crop_min_pixels or CROP_MIN_PIXELS, crop_max_pixels or CROP_MAX_PIXELS)
    eos, stop = tuple(sampling.pop("eos_token_ids", ovis.EOS_IDS)), (ovis.TOOL_CALL_END_ID,) if registry else ()
    budget = None if thinking_budget is None else max(0, min(thinking_budget, max_new_tokens - forced - 1))
    outs = [Rollout(token_ids=t, gen_mask=[0] * len(t), prompt_len=len(t))
            for t in (p["input_ids"].reshape(-1).tolist() for p in prompts)]
    pix = [[(p["pixel_values"], p["grid_thws"])] if p.get("grid_thws") is not None else [] for p in prompts]
    active, st, repeat = list(range(len(prompts))), None, group if kv_cache else 1
    chunk, new_pix = [o.token_ids for o in outs[::repeat]], [x for p in pix[::repeat] for x in p]
    while active:
        left = [max_new_tokens - outs[i].n_generated for i in active]
        n = max(left)  # generate shrinks a thinking budget to fit its own max_new_tokens: give a thinker room
        if budget is not None and st is not None and bool((~st.think_closed & (st.n_generated <= budget)).any()):
            n = max(n, budget + forced + 1)
        if not kv_cache:  # the reference: re-prefill all running rows each round
            chunk, new_pix, st = [outs[i].token_ids for i in active], [x for i in active for x in pix[i]], None
        n_pad = max(map(len, chunk))
        ids = torch.tensor([[ovis.PAD_ID] * (n_pad - len(c)) + c for c in chunk], device=dev)
        pv, g = (torch.cat([x[k] for x in new_pix]).to(dev) if new_pix else None for k in (0, 1))
        new, st = model.generate(ids, pv, g, max_new_tokens=n, eos_token_ids=eos, stop_token_ids=stop,
                                 thinking_budget=budget, state=st, return_state=True, repeat=repeat, **sampling)
        repeat = 1  # a group shares only the prompt: one ViT pass and prefill, then copies of its KV cache
        keep, chunk, new_pix = [], [], []
        for j, i in enumerate(active):
            o, toks = outs[i], new[j].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in eos or t in stop), len(toks))
            toks = toks[:min(end, left[j])]  # a row past its own budget is cut (and leaves the batch)
            o.token_ids, o.gen_mask, o.n_generated = o.token_ids + toks, o.gen_mask + [1] * len(toks), \
                o.n_generated + len(toks)
            said = tokenizer.decode(toks[:-1] if toks and toks[-1] in eos else toks)
            o.text += said
            if not (toks and toks[-1] in stop and o.n_generated < max_new_tokens):
                o.finish = "eos" if toks and toks[-1] in eos else "length"
                continue
            call = parse_tool_call(said) if "<tool_call>" in said else ToolCall(error="</tool_call> without a start")
            over = len(o.tool_calls) >= max_tool_calls and (call.error or registry.get(call.name) is not None)
            res = ToolResult(name=call.name, text=NO_MORE_TOOLS, error=True) if over else \
                registry.execute(call, images[i], keys[i])  # (an unknown tool says so, even past the budget)
            try:  # a crop too thin for the pixel budget is an error the model reads, not a crash
                p, g = tool_result_pixels(res, *crop_px, vit.patch_size, vit.hidden_stride)
            except ValueError:
                res, p, g = _err(res.name, f"the {res.image.width}x{res.image.height} crop is too thin to show; use "
                                 "a less elongated box"), None, None
            o.tool_calls.append({"name": res.name, "args": call.args, "ok": not res.error, "result": res.text})
            add = tool_result_ids(res, tokenizer)
            if g is not None:
                add = ovis.expand_placeholders(add, g, vit.hidden_stride)
                o.crops, pix[i], new_pix = o.crops + [res.image], pix[i] + [(p, g)], new_pix + [(p, g)]
            o.text += "<image>" if g is not None else tokenizer.decode(add)
            o.token_ids, o.gen_mask, keep, chunk = o.token_ids + add, o.gen_mask + [0] * len(add), keep + [j], \
                chunk + [add]
        if kv_cache and 0 < len(keep) < len(active):
            st.keep(keep)  # finished rows leave the batch and its KV cache
        active = [active[j] for j in keep]
    fmt = getattr(registry and registry.get("crop"), "bbox_format", "pixel")
    for o, px, imgs in zip(outs, pix, images):
        gen = [k for k, v in enumerate(o.gen_mask) if v]
        if budget is not None and ovis.THINK_END_ID not in [o.token_ids[k] for k in gen[:budget]]:
            for k in gen[budget:budget + forced]:  # forced at exactly `budget` generated tokens: not sampled
                o.gen_mask[k] = 0
        o.thinking, o.answer = split_output(o.text)
        o.model_text = tokenizer.decode([t for t, m in zip(o.token_ids, o.gen_mask) if m and t not in eos])
        o.thinking_on = o.token_ids[max(0, o.prompt_len - 4):o.prompt_len] != list(ovis.EMPTY_THINK_IDS)
        o.image_size, o.bbox_format = (imgs[0].size if imgs else None), fmt
        o.pixel_values, o.grid_thws = (torch.cat([x[k] for x in px]) if px else None for k in (0, 1))
    return outs


# ----------------------------------------------------------------------------------------------------------------
# Scoring a tool trajectory: fn(rollout, sample) -> float, one definition for GRPO's rewards and `infer.py --score`.
# `sample` holds the gold `answer` (a string, number or list) and optionally the gold `bbox` (rollout.bbox_format).

def _norm(s) -> str:  # lower case, no punctuation, no articles
    return " ".join(w for w in re.sub(r"[^\w\s%-]", " ", str(s).lower()).split() if w not in ("a", "an", "the"))


def _number(s) -> float | None:
    nums = re.findall(r"-?\d+(?:\.\d+)?", str(s).replace(",", ""))
    return float(nums[0]) if len(nums) == 1 else None


def score_accuracy(r: Rollout, sample: dict) -> float:
    """1 if r.answer matches sample["answer"] (or one of a list): by value for a number, else as _norm'd text."""
    gold, pred = sample.get("answer"), r.answer
    for g in (gold if isinstance(gold, list) else [gold]) if gold is not None and pred else []:
        if re.fullmatch(r"\s*-?[\d,]+(\.\d+)?\s*", str(g)):  # a number: compare values ("3.0", "3 squares")
            if _number(pred) is not None and abs(_number(pred) - _number(g)) <= 1e-6 * max(1.0, abs(_number(g))):
                return 1.0
        elif _norm(pred) == _norm(g):
            return 1.0
    return 0.0


def score_format(r: Rollout, sample: dict) -> float:
    """1 if the trajectory is well-formed (the rules below), else 0."""
    t, said = r.text.strip(), r.model_text
    if "<tool_response>" in said or "</tool_response>" in said:  # the model wrote tool output itself
        return 0.0
    if r.thinking_on:  # one <think>...</think> holding every tool call, then <answer>...</answer> to the end
        m = re.fullmatch(r"<think>(.*?)</think>\s*<answer>(.+?)</answer>", t, re.DOTALL)
        if not m or "<think>" in m.group(1) or "<tool_call>" in t[m.end(1):]:
            return 0.0
    elif not re.search(r"<answer>.+?</answer>$", t, re.DOTALL):  # no thinking: the answer block closes the text
        return 0.0
    calls = re.findall(r"<tool_call>.*?</tool_call>", said, re.DOTALL)
    if len(calls) != said.count("<tool_call>") or len(calls) != said.count("</tool_call>"):
        return 0.0
    known = {c["name"].lower() for c in r.tool_calls if "unknown tool" not in str(c.get("result"))}  # by the loop
    try:  # every call parses, a Crop/Identify box is well-formed (whether it hits the image is iou's business)
        return float(all(not p.error and (bbox_args(p.args) if p.name.lower() in ("crop", "identify") else
                                          p.name.lower() in known) for p in map(parse_tool_call, calls)))
    except ValueError:
        return 0.0


def score_iou(r: Rollout, sample: dict) -> float:
    """Mean IoU of the Crop calls' boxes with sample["bbox"] (a failed crop counts 0); 0 without a crop."""
    gt, crops = sample.get("bbox"), [t for t in r.tool_calls if t["name"].lower() == "crop"]
    if gt is None or not crops or r.image_size is None:
        return 0.0
    gt = to_pixels(gt, r.image_size, r.bbox_format)
    return sum(iou(to_pixels(t["args"], r.image_size, r.bbox_format), gt) for t in crops if t["ok"]) / len(crops)


def score_tool(r: Rollout, sample: dict) -> float:
    """Tool use paid only when it helped: the answer is right and at least one Crop actually ran."""
    return float(score_accuracy(r, sample) == 1.0 and any(t["ok"] and t["name"].lower() == "crop"
                                                          for t in r.tool_calls))


# The seed's three rewards (seed-behaviour 6.3), rule for rule, on the text with the real tool results.
STRICT_CALL = re.compile(r"<tool_call>(Crop|Identify) \[([\d.,\s]+)\]</tool_call>")
KEYWORDS = "who|identify|person|people|crop|examine|look at|focus on|region|area|section".split("|")


def score_tool_usage(r: Rollout, sample: dict) -> float:
    t = r.text
    calls = [m for m in STRICT_CALL.finditer(t) if len(re.findall(r"\d+(?:\.\d*)?|\.\d+", m.group(2))) == 4]
    if not calls:
        return 0.0 if any(k in t.lower() for k in KEYWORDS) else 0.5
    score, ident = 0.3, [m for m in calls if m.group(1) == "Identify"]
    if ident:
        score += 0.4 * sum(bool(re.match(r"\s*<tool_response>[^<]", t[m.end():])) for m in ident) / len(ident)
    think = re.search(r"<think>.*?</think>", t, re.DOTALL)
    if think and all(think.start() <= m.start() and m.end() <= think.end() for m in calls):
        score += 0.3
    return min(score, 1.0)


def score_bbox_validity(r: Rollout, sample: dict) -> float:
    boxes = re.findall(r"\[(\d+(?:\.\d+)?),\s*(\d+(?:\.\d+)?),\s*(\d+(?:\.\d+)?),\s*(\d+(?:\.\d+)?)\]", r.text)
    bad = sum(float(b[0]) >= float(b[2]) or float(b[1]) >= float(b[3]) for b in boxes)
    return 1.0 - bad / len(boxes) if boxes else 1.0


def score_reasoning_quality(r: Rollout, sample: dict) -> float:
    t = r.text
    score = 0.3 * ("<think>" in t and "</think>" in t) + 0.3 * ("<answer>" in t and "</answer>" in t)
    think = re.search(r"<think>(.*?)</think>", t, re.DOTALL)
    if think and "<tool_call>" in think.group(1):
        score += 0.2 * (len(think.group(1).split("<tool_call>")[0].split()) > 10)
    n_words = len(t.split())
    score *= 0.5 if n_words < 20 else 0.8 if n_words > 1000 else 1.0
    if "<tool_response>" in t:
        gaps = re.findall(r"</tool_response>(.*?)(?=<tool_call>|</think>)", t, re.DOTALL)
        score += 0.2 * any(len(g.split()) > 5 for g in gaps)
    return min(score, 1.0)


SCORERS = {"format": score_format, "accuracy": score_accuracy, "iou": score_iou, "tool": score_tool,
           "tool_usage": score_tool_usage, "bbox_validity": score_bbox_validity,
           "reasoning_quality": score_reasoning_quality}


def parse_scorers(spec: str, key: str = "rewards") -> list[tuple[str, float, Callable]]:
    """"format:0.5|accuracy|mypkg.scores.f:0.3" -> [(name, weight, fn)]; a dotted name is imported."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split("|"))):
        name, _, w = part.partition(":")
        if "." not in name and name not in SCORERS:
            raise ValueError(f"{key}: unknown scorer {name!r}; built-in: {', '.join(SCORERS)}, or a dotted path")
        fn = common.import_object(name, key) if "." in name else SCORERS[name]
        out.append((name, float(w) if w else 1.0, fn))
    if not out:
        raise ValueError(f"{key} is empty")
    return out


def trajectory_stats(r: Rollout, sample: dict) -> Counter:
    """Counts of one trajectory that add up over a set (and over ranks); `summarize` turns their sums into rates."""
    crops = [t for t in r.tool_calls if t["name"].lower() == "crop"]
    n_iou = len(crops) if sample.get("bbox") is not None and r.image_size is not None else 0
    out = Counter(questions=1, accuracy=score_accuracy(r, sample), format=score_format(r, sample),
                  tool_calls=len(r.tool_calls), crops=len(crops), crops_ok=sum(t["ok"] for t in crops),
                  iou_sum=score_iou(r, sample) * n_iou, iou_n=n_iou, gen_tokens=r.n_generated)
    out.update([f"finish.{r.finish}"] + [f"tool.{t['name']}" for t in r.tool_calls])
    return out


def summarize(totals: Counter) -> dict:
    """Summed trajectory_stats -> the rates and means below (None: nothing to measure), finishes, calls per tool."""
    n = max(totals["questions"], 1)
    return {"questions": totals["questions"], "accuracy": totals["accuracy"] / n, "format_rate": totals["format"] / n,
            "tool_calls_per_question": totals["tool_calls"] / n,
            "valid_crop_rate": totals["crops_ok"] / totals["crops"] if totals["crops"] else None,
            "mean_crop_iou": totals["iou_sum"] / totals["iou_n"] if totals["iou_n"] else None,
            "mean_generated_tokens": totals["gen_tokens"] / n,
            "finish": {k[7:]: v for k, v in sorted(totals.items()) if k.startswith("finish.")},
            "tools": {k[5:]: v for k, v in sorted(totals.items()) if k.startswith("tool.")}}
