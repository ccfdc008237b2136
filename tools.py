"""The tools the model may call while it thinks (Crop returns an image, Identify a text, yours: `load_tools`), the tool
loop of inference and GRPO rollouts (`ToolLoop`: both engines'; `run_tool_loop`: on model.generate); scoring.py scores.

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
import sys
import traceback
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
MIN_CROP_SIDE = ovis.ViTConfig.patch_size * ovis.ViTConfig.hidden_stride  # the resize factor: a smaller crop
# carries less than one visual token a side
CROP_MIN_PIXELS, CROP_MAX_PIXELS = 448 * 448, 896 * 896  # tool crops: small crops are upscaled to min_pixels


class ToolInputError(ValueError):
    """A call a tool cannot serve as asked (a box that is no box, outside the image...): the model reads why."""


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
                       crop_max_pixels: int = CROP_MAX_PIXELS, patch_size: int = ovis.ViTConfig.patch_size,
                       hidden_stride: int = ovis.ViTConfig.hidden_stride):
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
    """Accept [x1, y1, x2, y2] or a JSON dict holding it under bbox / bbox_2d / box; ToolInputError otherwise."""
    if isinstance(args, str):  # OpenAI-style JSON arguments given as a string
        try:
            args = json.loads(args)
        except ValueError:
            raise ToolInputError("arguments are not valid JSON") from None
    if isinstance(args, dict):
        args = next((args[k] for k in ("bbox", "bbox_2d", "box") if k in args), None)
    if not isinstance(args, (list, tuple)) or len(args) != 4:
        raise ToolInputError("a box needs exactly 4 numbers [x1, y1, x2, y2]")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args):
        raise ToolInputError("box values must be finite numbers")
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
            raise ToolInputError(f"box {[round(v, 2) for v in bbox_args(box)]} has zero area in the {W}x{H} image")
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
            self.table = common.read_json(self.backend, "identify map")

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
        self.crashed: set = set()  # (tool, exception type) whose traceback was logged

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
        except ToolInputError as e:  # a call the tool cannot serve (a box outside the image...): the model reads why
            return _err(getattr(call, "name", "?") or "?", str(e) or type(e).__name__)
        except Exception as e:  # a tool that crashed: the model reads the error, the log gets its first traceback
            name = getattr(call, "name", "?") or "?"
            if (name, type(e).__name__) not in self.crashed:
                self.crashed.add((name, type(e).__name__))
                print(f"warning: tool {name} raised {type(e).__name__} (answered as an error; each tool's first such "
                      f"traceback is shown):\n{traceback.format_exc()}", file=sys.stderr, end="")
            return _err(name, f"{type(e).__name__}: {e}")

    def names(self) -> list[str]:
        return [t.name for t in self.tools.values()]


def load_tools(spec: str = "Crop|Identify", bbox_format: str = "pixel", identify=None) -> Registry:
    """"Crop|Identify|mypkg.ocr:OCR|tests.my_tools:Flip{"axis": 1}" -> a Registry: built-ins by name, others as
    module:Class (a Tool subclass), any with JSON kwargs; `bbox_format` goes where taken, `identify` to Identify."""
    if bbox_format not in BBOX_FORMATS:
        raise common.ConfigError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    found, pos = [], 0
    while pos < len(spec.rstrip()):
        m = re.compile(r"\s*([\w.]+(?::\w+)?)\s*(\{.*?\})?\s*(\||$)").match(spec, pos)  # Name{json}|
        if not m:
            raise common.ConfigError(f"tools: cannot read {spec[pos:]!r}; write Name, module:Class or Name{{json}}, "
                                     "|-apart")
        name, pos = m.group(1), m.end()
        try:
            kw = json.loads(m.group(2) or "{}")
        except ValueError as e:
            raise common.ConfigError(f"tools: the keyword arguments of {name} are not a JSON object: {e}") from None
        builtin = {"crop": Crop, "identify": Identify}.get(name.lower())
        cls = common.import_object(name, "tools") if ":" in name else builtin
        if not (isinstance(cls, type) and issubclass(cls, Tool)):
            raise common.ConfigError(f"tools: {name!r} is not a built-in tool (Crop, Identify) nor a tools.Tool "
                                     "subclass")
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
    logprobs: list | None = None  # vLLM: per token_ids entry, the sampling log-prob where sampled, else None
    engine_note: str = ""  # vLLM: why a trajectory ended early (vllm_max_model_len reached, too many images)


def split_output(text: str) -> tuple[str, str]:
    """(thinking: inside the first <think>...</think> or to the end, answer: <answer>...</answer> or all after it)."""
    head, closed, tail = text.partition("</think>")
    rest = tail if closed else ("" if "<think>" in head else text)
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", rest, re.DOTALL)
    return (head.split("<think>", 1)[1].strip() if "<think>" in head else ""), (m.group(1) if m else rest).strip()


@dataclass
class Row:
    """One trajectory while a loop runs it: its Rollout so far and what its tools and the model read."""
    out: Rollout
    images: list  # the conversation's original images (what its tools run on)
    keys: list  # their names in the data (what an Identify map is indexed by)
    visuals: list  # (pixel_values (N, D), grid_thws (1, 3)) of every image in out.token_ids, in order

    def add(self, ids: list[int], sampled: bool):
        """Append ids; sampled: the model generated them (gen_mask 1, counted against max_new_tokens: forced
        thinking-budget text too, until ToolLoop.finish unmasks it); else a tool's result (0, not counted)."""
        self.out.token_ids = self.out.token_ids + ids
        self.out.gen_mask = self.out.gen_mask + [int(sampled)] * len(ids)
        self.out.n_generated += len(ids) if sampled else 0


@dataclass
class ToolLoop:
    """What both engines' tool loops share (model.generate: run_tool_loop below; vLLM: vllm_engine.py): the settings,
    what one finished round means for a row (its tool call runs, the result is appended as training renders it), and
    the finished Rollout. `geometry`: the checkpoint's patch_size / hidden_stride (OvisConfig.geometry)."""
    tokenizer: object
    registry: Registry | None
    geometry: dict
    max_tool_calls: int = 8
    max_new_tokens: int = 1024
    crop_pixels: tuple = (CROP_MIN_PIXELS, CROP_MAX_PIXELS)  # (min, max) of an image tool's result
    eos: tuple = ovis.EOS_IDS

    @property
    def stop(self) -> tuple:  # a row stops for its tool at `</tool_call>` (no registry: plain generation)
        return (ovis.TOOL_CALL_END_ID,) if self.registry else ()

    def start(self, prompt: dict, images: list, keys: list) -> Row:
        """A model.build_inputs prompt and its conversation's images -> a row that has generated nothing yet."""
        ids = prompt["input_ids"].reshape(-1).tolist()
        seen = [(prompt["pixel_values"], prompt["grid_thws"])] if prompt.get("grid_thws") is not None else []
        return Row(Rollout(token_ids=ids, gen_mask=[0] * len(ids), prompt_len=len(ids)), list(images), list(keys), seen)

    def after_round(self, row: Row, toks: list[int]) -> list[int] | None:
        """A row's tokens of one round (ending with its eos or stop id unless its budget ran out), already added ->
        the ids it continues with (its tool call's result, never learned), or None: the row is done. In three steps,
        which vLLM's loop takes apart to run the tool off its scheduling thread: read_round, run, append."""
        call = self.read_round(row, toks)
        return None if call is None else self.append(row, call, self.run(row, call))

    def read_round(self, row: Row, toks: list[int]) -> "ToolCall | None":
        """The round's text joins the row's; -> the tool call it ends with, or None: the row is done (finish set)."""
        o = row.out
        ended = bool(toks) and toks[-1] in self.eos
        said = self.tokenizer.decode(toks[:-1] if ended else toks)
        o.text += said
        if not (toks and toks[-1] in self.stop and o.n_generated < self.max_new_tokens):
            o.finish = "eos" if ended else "length"
            return None
        return parse_tool_call(said) if "<tool_call>" in said else ToolCall(error="</tool_call> without a start")

    def run(self, row: Row, call: ToolCall) -> ToolResult:
        """The call's result, on the row's own images (past max_tool_calls: an error the model reads). Touches nothing
        of the row: vLLM's loop runs it in a worker thread while the other rows decode."""
        known = call.error or self.registry.get(call.name) is not None  # (an unknown tool says so, even past the
        if len(row.out.tool_calls) >= self.max_tool_calls and known:  # budget: the format reward relies on it)
            return ToolResult(name=call.name, text=NO_MORE_TOOLS, error=True)
        return self.registry.execute(call, row.images, row.keys)

    def append(self, row: Row, call: ToolCall, res: ToolResult) -> list[int]:
        """The result rendered as training renders it, added to the row (unlearned) -> those ids."""
        o = row.out
        try:  # a crop too thin for the pixel budget is an error the model reads, not a crash
            pv, grid = tool_result_pixels(res, *self.crop_pixels, **self.geometry)  # (N, D), (1, 3)
        except ValueError:
            why = f"the {res.image.width}x{res.image.height} crop is too thin to show; use a less elongated box"
            res, pv, grid = _err(res.name, why), None, None
        o.tool_calls.append({"name": res.name, "args": call.args, "ok": not res.error, "result": res.text})
        add = tool_result_ids(res, self.tokenizer)
        if grid is not None:  # an image: its placeholder expanded to the crop's visual tokens
            add = ovis.expand_placeholders(add, grid, self.geometry["hidden_stride"])
            o.crops.append(res.image)
            row.visuals.append((pv, grid))
        o.text += "<image>" if grid is not None else self.tokenizer.decode(add)
        row.add(add, sampled=False)
        return add

    def finish(self, row: Row, budget: int | None = None) -> Rollout:
        """The finished row's Rollout: the thinking-budget text forced at exactly `budget` generated tokens unmasked
        (not sampled, never learned), thinking / answer split, the model's own text, every image in token order."""
        o, n_forced = row.out, len(ovis.THINK_EARLY_STOP_IDS)
        gen = [k for k, m in enumerate(o.gen_mask) if m]
        if budget is not None and ovis.THINK_END_ID not in [o.token_ids[k] for k in gen[:budget]]:
            for k in gen[budget:budget + n_forced]:
                o.gen_mask[k] = 0
                if o.logprobs is not None:
                    o.logprobs[k] = None
        o.thinking, o.answer = split_output(o.text)
        o.model_text = self.tokenizer.decode([t for t, m in zip(o.token_ids, o.gen_mask) if m and t not in self.eos])
        o.thinking_on = o.token_ids[max(0, o.prompt_len - 4):o.prompt_len] != list(ovis.EMPTY_THINK_IDS)
        o.image_size = row.images[0].size if row.images else None
        o.bbox_format = getattr(self.registry and self.registry.get("crop"), "bbox_format", "pixel")
        o.pixel_values, o.grid_thws = (torch.cat([x[k] for x in row.visuals]) if row.visuals else None for k in (0, 1))
        return o


def thinking_budget_for(thinking_budget: int | None, max_new_tokens: int) -> int | None:
    """The budget a loop runs with: shrunk so the forced end of thinking and one answer token still fit."""
    if thinking_budget is None:
        return None
    return max(0, min(thinking_budget, max_new_tokens - len(ovis.THINK_EARLY_STOP_IDS) - 1))


def _streamer(events, rows: list):
    """model.generate's on_step for one round: each running row's new token to events.token; the rows whose
    client left end at once."""
    def on_step(tok: torch.Tensor, running: torch.Tensor) -> torch.Tensor:  # (B,) each
        for j, i in enumerate(rows):
            if running[j]:
                events.token(i, int(tok[j]))
        return torch.tensor([events.cancelled(i) for i in rows], device=tok.device)
    return on_step


def run_tool_loop(model, tokenizer, prompts: list, *, images: list | None = None, keys: list | None = None,
                  registry: "Registry | None" = None, max_tool_calls: int = 8, max_new_tokens: int = 1024,
                  thinking_budget: int | None = None, kv_cache: bool = True, crop_min_pixels: int | None = None,
                  crop_max_pixels: int | None = None, group: int = 1, events=None, **sampling) -> list[Rollout]:
    """Generate for model.build_inputs prompts with model.generate, running tool calls as they come: a round decodes
    the running rows until `</tool_call>` or an eos; `registry` (None: no tools) runs each call on its row's `images`
    (`keys`: their names) and the result is appended as training renders it, decoding goes on from the KV cache.
    max_new_tokens / thinking_budget count a row's model tokens over all rounds; `group` rollouts per prompt (GRPO),
    row-major, as if each prompt came `group` times (its ViT pass and prefill run once); `sampling`: generate's.
    events (a server's): .token(row, id) for each new token, .tool(row, call, crop | None) for each call run,
    .cancelled(row) -> True ends the row at once (finish "cancelled")."""
    if thinking_budget is not None and not kv_cache:
        raise ValueError("thinking_budget needs kv_cache=True (it counts tokens over all rounds)")
    crop_pixels = (crop_min_pixels or CROP_MIN_PIXELS, crop_max_pixels or CROP_MAX_PIXELS)
    eos = tuple(sampling.pop("eos_token_ids", ovis.EOS_IDS))
    loop = ToolLoop(tokenizer, registry, model.config.geometry, max_tool_calls, max_new_tokens, crop_pixels, eos)
    dev = next(model.parameters()).device
    forced = len(ovis.THINK_EARLY_STOP_IDS)  # the end-of-thinking ids a thinking budget forces
    budget = thinking_budget_for(thinking_budget, max_new_tokens)
    images = images or [[] for _ in prompts]
    keys = keys or [[] for _ in prompts]
    rows = [loop.start(p, im, k) for p, im, k in zip(prompts, images, keys) for _ in range(group)]
    active = list(range(len(rows)))  # the rows still decoding (indexes into rows)
    state = None  # model.generate's KV cache and counters, carried from round to round
    repeat = group if kv_cache else 1  # first round: each prompt once, its group copies of its KV cache after it
    chunks = [r.out.token_ids for r in rows[::repeat]]  # what each running row feeds the model next (B lists)
    new_visuals = [v for r in rows[::repeat] for v in r.visuals]  # the images those chunks hold, in order
    while active:
        left = [max_new_tokens - rows[i].out.n_generated for i in active]
        n = max(left)  # generate shrinks a thinking budget to fit its own max_new_tokens: give a thinker room
        if budget is not None and state is not None and bool((~state.think_closed & (state.n_generated <= budget))
                                                             .any()):
            n = max(n, budget + forced + 1)
        if not kv_cache:  # the reference: re-prefill all running rows each round
            chunks = [rows[i].out.token_ids for i in active]
            new_visuals = [v for i in active for v in rows[i].visuals]
            state = None
        width = max(map(len, chunks))
        ids = torch.tensor([[ovis.PAD_ID] * (width - len(c)) + c for c in chunks], device=dev)  # (B, width)
        pv, grids = (torch.cat([v[k] for v in new_visuals]).to(dev) if new_visuals else None for k in (0, 1))
        new, state = model.generate(ids, pv, grids, max_new_tokens=n, eos_token_ids=loop.eos,
                                    stop_token_ids=loop.stop, thinking_budget=budget, state=state, return_state=True,
                                    repeat=repeat, on_step=events and _streamer(events, list(active)),
                                    **sampling)  # new: (B * repeat, n) tokens, PAD after a row ended
        repeat = 1  # a group shares only the prompt: one ViT pass and prefill, then copies of its KV cache
        keep = []  # the positions in `active` of the rows that go on
        chunks = []
        new_visuals = []
        for j, i in enumerate(active):
            toks = new[j].tolist()
            end = next((k + 1 for k, t in enumerate(toks) if t in loop.eos or t in loop.stop), len(toks))
            toks = toks[:min(end, left[j])]  # a row past its own budget is cut (and leaves the batch)
            rows[i].add(toks, sampled=True)
            if events is not None and events.cancelled(i):  # its client left: no tool, no more tokens
                rows[i].out.text += tokenizer.decode(toks)
                rows[i].out.finish = "cancelled"
                continue
            calls = len(rows[i].out.tool_calls)
            more = loop.after_round(rows[i], toks)
            if events is not None and len(rows[i].out.tool_calls) > calls:
                events.tool(i, rows[i].out.tool_calls[-1], rows[i].out.crops[-1] if more and ovis.VISUAL_ATOM_ID in
                            more else None)
            if more is not None:
                keep.append(j)
                chunks.append(more)
                if ovis.VISUAL_ATOM_ID in more:  # a crop: its pixels go with this chunk
                    new_visuals.append(rows[i].visuals[-1])
        if kv_cache and 0 < len(keep) < len(active):
            state.keep(keep)  # finished rows leave the batch and its KV cache
        active = [active[j] for j in keep]
    return [loop.finish(r, budget) for r in rows]


def pack_rollouts(rollouts: list, device) -> dict:
    """Rollouts -> one packed training row (1, T), as GRPO scores them: ids, labels (= ids where the model sampled the
    token, else ignored), position_ids restarting per rollout, their images in order."""
    ids = [t for r in rollouts for t in r.token_ids]
    labels = [t if m else ovis.IGNORE_ID for r in rollouts for t, m in zip(r.token_ids, r.gen_mask)]
    pos = [i for r in rollouts for i in range(len(r.token_ids))]
    pv = [r.pixel_values for r in rollouts if r.pixel_values is not None]
    g = [r.grid_thws for r in rollouts if r.grid_thws is not None]
    t, cat = lambda x: torch.tensor([x], device=device), lambda x: torch.cat(x).to(device) if x else None
    return {"input_ids": t(ids), "labels": t(labels), "position_ids": t(pos), "pixel_values": cat(pv),
            "grid_thws": cat(g)}
