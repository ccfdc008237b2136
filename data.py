"""From a file on disk to token ids, labels and pixels: the one data path of SFT, LoRA, GRPO and inference.

Data (spec seed-behaviour 1): a JSON list, JSONL or `{"conversations": [samples]}` of
    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent (or "video": file | "video_frames": [paths]),
     "conversations": [{"from": "system" | "human" | "gpt" (also user/assistant/ignored_gpt), "value": "..."}]}
Paths are relative to `image_dir`; `<image>` in system/human turns places the k-th image (without any, the images
open the first human turn). Training rendering = the official Qwen3ConversationFormatter (spec 9.4, 11.1), token for
token:
* each turn is `<|im_start|>{role}\n{value}<|im_end|>\n`, tokenized on its own, chunk-wise around placeholders;
* a gpt turn without a `<think>...</think>` block gets `<think>\n\n</think>\n\n` after its role prefix;
* what is learned, and what never is: `_tokens_and_labels`.
Tool turns (spec 14) in a gpt value: the `<tool_call>...</tool_call>` text is learned, its result never.
* `<tool_call>Crop [x1, y1, x2, y2]</tool_call><image>`: the crop of the first image sits at `<image>`; a Crop
  without `<image>` (the seed's old format) gets one: inference always answers a Crop with an image.
* any other call must be followed directly by its recorded `<tool_response>result</tool_response>`.
Also: GRPO / inference prompts (`prompt_messages`, for `model.build_inputs`), `SFTDataset` and its micro-batches of
packed rows, `python data.py check`. Over-long samples: `Budgets.overlong`, never cut inside an image.
"""

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image

import common
import model as ovis
import scoring
import tools
from model import IGNORE_ID, IMAGE_TOKEN_ID, PAD_ID, VIDEO_TOKEN_ID, VISUAL_ATOM_ID

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "ignored_gpt": "ignored"}
EMPTY_THINK = "<think>\n\n</think>\n\n"
FORBIDDEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # would break the turn structure or the pad mask


class SampleError(ValueError):
    """A bad sample: str() is the one-line report `file:index id=... field=...: why`; `reason`: its skip bucket."""

    def __init__(self, file, index, id, field: str, why: str, reason: str = ""):
        self.file, self.index, self.id, self.field, self.why = file, index, id, field, why
        self.reason = reason or ("over-long" if field == "length" else field.split("[")[0])
        super().__init__(f"{file}:{index} id={id} field={field}: {why}")


def _need(sample: dict):
    """`need(ok, field, why, reason="")` for one sample: raises the sample's SampleError unless ok."""
    where = sample.get("_file", "?"), sample.get("_index", "?"), sample.get("id", sample.get("_index"))

    def need(ok, field: str, why: str, reason: str = ""):
        if not ok:
            raise SampleError(*where, field, why, reason)
    return need


def load_samples(path, errors: list | None = None) -> list[dict]:
    """A JSON list, one sample, the seed's `{"conversations": [samples]}` or JSONL; `_file` and `_index` (the line a
    sample starts on, from 1) added. Bad JSON and non-objects raise SampleError, or go to `errors` if one is given."""
    path, text, out = str(path), Path(path).read_text(encoding="utf-8"), []
    items = _json(text)
    conv = items.get("conversations") if isinstance(items, dict) else None
    if isinstance(items, json.JSONDecodeError):  # JSONL (a broken JSON list: one error, at the line the parser stopped)
        items = [(items.lineno, items)] if text.lstrip().startswith("[") else [
            (i, _json(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif conv and isinstance(conv[0], dict) and "conversations" in conv[0]:  # the seed's wrapper: element numbers
        items = list(enumerate(conv, 1))
    elif isinstance(items, list):
        items = list(zip(_element_lines(text, len(items)), items))
    else:
        items = [(1, items)]
    for i, s in items:
        if isinstance(s, dict):
            out.append({**s, "_file": path, "_index": i})
            continue
        why = f"invalid JSON: {s}" if isinstance(s, json.JSONDecodeError) else f"not an object: {type(s).__name__}"
        if errors is None:
            raise SampleError(path, i, None, "json", why)
        errors.append(SampleError(path, i, None, "json", why))
    return out


def _element_lines(text: str, n: int) -> list[int]:
    """The line (from 1) each of the n top-level elements of a JSON list text starts on."""
    decoder, lines, pos, line, counted = json.JSONDecoder(), [], text.index("[") + 1, 1, 0
    for _ in range(n):
        pos = re.compile(r"[\s,]*").match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        lines.append(line)
        pos = decoder.raw_decode(text, pos)[1]
    return lines


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return e


def _open(path: Path, decode: bool, need, field: str = "image"):
    """An RGB image (decode) or just its (W, H) from the header (the length pass); unreadable: the sample is bad."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB") if decode else im.size  # convert() decodes: a truncated file raises here
    except Exception as e:
        _unreadable(need, field, path, e)


def _unreadable(need, field: str, path, e: Exception):
    """The sample is bad: `missing|unreadable {field} {path} (cause)`, without the path an OSError's cause repeats."""
    why = f"{type(e).__name__}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
    need(False, field, f"{'missing' if isinstance(e, FileNotFoundError) else 'unreadable'} {field} {path} ({why})")


def _assistant_tools(value: str, registry: tools.Registry, need) -> tuple[str, list, Counter, int]:
    """Check the tool turns of one gpt value. Returns (value with old-format Crop results inserted, the Crop calls
    in the order of their `<image>`, tool-call counts by name, number of inserted `<image>`)."""
    for a in ("tool_call", "tool_response"):
        need(value.count(f"<{a}>") == value.count(f"</{a}>"), f"unbalanced <{a}>...</{a}> tags")
    out, pos, crops, counts = [], 0, [], Counter()
    for k, m in enumerate(tools.CALL_RE.finditer(value)):
        call = tools.parse_tool_call(m.group(1))
        tool = None if call.error else registry.get(call.name)
        counts[tool.name if tool else call.name or "?"] += 1
        out.append(value[pos:m.end()])
        pos, after, what = m.end(), value[m.end():], f"tool call {k + 1} ({call.name or '?'})"
        why = call.error or ("" if tool else f"unknown tool {call.name!r}")
        if after.startswith("<tool_response>"):  # a text result recorded in the data; a recorded error is fine
            need(not why or after.startswith("<tool_response>Error"), f"{what}: {why}")
            continue
        need(not why and tool.returns == "image",
             f"{what}: {why or 'must be followed directly by <tool_response>...</tool_response>'}")
        out.append("" if after.startswith("<image>") else "<image>")  # the seed's old format: add the result
        crops.append(call)
    new = "".join(out) + value[pos:]
    need(new.count("<image>") == len(crops) and "<video>" not in new,
         "<image> in a gpt turn must directly follow the </tool_call> of a Crop")
    need(new.count("<tool_response>") == new.count("</tool_call><tool_response>"),
         "<tool_response> must directly follow </tool_call>")
    return new, crops, counts, new.count("<image>") - value.count("<image>")


@dataclass
class Budgets:
    """How large a training sample may get (spec 11.2; defaults: the official training arguments), for every stage."""
    single_image_min_pixels: int = 448 * 448
    single_image_max_pixels: int = 1792 * 1792
    multiple_image_min_pixels: int = 448 * 448  # per image when a sample has several; negative: the single min
    multiple_image_max_pixels: int = 896 * 896  # negative: max(min, single max // number of images)
    video_min_pixels: int = 448 * 448  # per frame
    video_max_pixels: int = 896 * 896
    min_frames: int = 8  # a video is resampled to between min_frames and max_frames frames
    max_frames: int = 8
    crop_min_pixels: int = tools.CROP_MIN_PIXELS  # image tool results (Crop)
    crop_max_pixels: int = tools.CROP_MAX_PIXELS
    max_length: int | None = None  # tokens; a longer sample follows `overlong`
    text_max_length: int | None = None  # the same for samples without visuals (official); None: max_length
    overlong: str = "drop"  # drop (a SampleError) | truncate (official: never inside an image or the video)

    @classmethod
    def of(cls, cfg, names: tuple[str, ...] | None = None) -> "Budgets":
        """The budgets a run config sets, field by field by name (default: all; GRPO and infer: IMAGE_BUDGETS). A config
        without one of them is an error: a renamed field never silently falls back to the default."""
        names = names or tuple(f.name for f in fields(cls) if f.name != "text_max_length")  # no stage sets it
        missing = [n for n in names if not hasattr(cfg, n)]
        if missing:
            raise common.ConfigError(f"{type(cfg).__name__} lacks the budget setting(s) {missing}")
        return cls(**{n: getattr(cfg, n) for n in names})

    def originals(self, n_images: int, video: bool) -> tuple[int, int]:
        """(min, max) pixels of each original image / frame."""
        if video:
            return self.video_min_pixels, self.video_max_pixels
        if n_images <= 1:
            return self.single_image_min_pixels, self.single_image_max_pixels
        lo = self.multiple_image_min_pixels if self.multiple_image_min_pixels >= 0 else self.single_image_min_pixels
        hi = self.multiple_image_max_pixels if self.multiple_image_max_pixels >= 0 else \
            max(lo, self.single_image_max_pixels // n_images)
        return lo, hi


IMAGE_BUDGETS = ("single_image_min_pixels", "single_image_max_pixels", "multiple_image_min_pixels",
                 "multiple_image_max_pixels", "crop_min_pixels", "crop_max_pixels")  # what a prompt's images take
RECORDED = (*IMAGE_BUDGETS, "video_min_pixels", "video_max_pixels", "min_frames", "max_frames", "tools", "bbox_format",
            "enable_thinking", "thinking_budget", "max_tool_calls")  # what an export records of its run (RECORD_FILE)


def sample_frames(n: int, min_frames: int, max_frames: int) -> list[int]:
    """The official training's choice of frames: all n when min_frames <= n <= max_frames, else the mid-point of each
    of t even strides over the n frames (t = min_frames or max_frames; frames repeat when n < t)."""
    if min_frames <= n <= max_frames:
        return list(range(n))
    t = min_frames if n < min_frames else max_frames
    return [min(n - 1, (round(n / t * i) + round(n / t * (i + 1))) // 2) for i in range(t)]


def _video(sample: dict, image_dir, b: Budgets, decode: bool, need) -> list:
    """A sample's video as its sampled frames: PIL images, or (decode=False) their (W, H) without decoding pixels.
    `video_frames`: frame image paths; `video`: a file, read with PyAV (optional; imported only here)."""
    if "video_frames" in sample:
        paths = sample["video_frames"]
        need(isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths), "video_frames",
             "must be a non-empty list of frame image paths")
        picked = [paths[i] for i in sample_frames(len(paths), b.min_frames, b.max_frames)]
        if not decode:  # the length pass reads one header (the frames of a video share their size), sees every file
            gone = [p for p in picked if not (Path(image_dir) / p).is_file()]
            if gone:
                need(False, "video_frames", f"missing frame {Path(image_dir) / gone[0]} ({len(gone)} of the "
                                            f"{len(picked)} sampled frames)")
            return [_open(Path(image_dir) / picked[0], False, need, "video_frames")] * len(picked)
        return [_open(Path(image_dir) / p, True, need, "video_frames") for p in picked]
    path = Path(image_dir) / str(sample["video"])
    try:
        import av
    except ImportError:
        need(False, "video", f"reading the video file {path} needs PyAV (pip install av); or give its frames as "
                             "video_frames")
    try:
        with av.open(str(path)) as c:  # the frame count without decoding: stream metadata, else one demux pass
            st = c.streams.video[0]
            n, size = st.frames or sum(1 for p in c.demux(st) if p.size), (st.width, st.height)
        want = Counter(sample_frames(n, b.min_frames, b.max_frames) if n > 0 else [])
        frames = [size] * sum(want.values())
        if decode:
            with av.open(str(path)) as c:
                frames = [im for i, f in enumerate(c.decode(video=0)) if i in want for im in [f.to_image()] * want[i]]
    except Exception as e:
        _unreadable(need, "video", path, e)
    # a stream whose metadata overstates its frames (a truncated file) must not silently train on fewer frames
    need(n > 0 and len(frames) == sum(want.values()), "video", f"{path}: {n} frames in its metadata, "
         f"{len(frames)} of the {sum(want.values())} sampled frames decoded (truncated or empty video?)")
    return frames


def _render(sample: dict, registry: tools.Registry, need) -> tuple[list, list, list, Counter, int]:
    """Step 1: validate and render the turns as the official formatter: [(role, role prefix, value)], image paths,
    image-tool calls in the order of their results, tool-call counts, how many old-format Crops got their `<image>`."""
    conv, video = sample.get("conversations"), "video" in sample or "video_frames" in sample
    paths = [sample["image"]] if isinstance(sample.get("image"), str) else sample.get("image") or []
    need(isinstance(conv, list) and conv, "conversations", "missing or empty list of turns")
    need(isinstance(paths, list) and all(isinstance(p, str) for p in paths), "image",
         "must be a path or a list of paths")
    need(not (paths and video), "video", "a sample has images or one video, not both (as the official trainer)")
    turns, crops, calls, auto = [], [], Counter(), 0  # turns: (role, role prefix, value)
    for t, turn in enumerate(conv):
        fld = f"conversations[{t}]"
        need(isinstance(turn, dict) and turn.get("from") in ROLES and isinstance(turn.get("value"), str), fld,
             f"a turn needs 'from' in {sorted(ROLES)} and a string 'value'")
        role, value = ROLES[turn["from"]], turn["value"]
        need(not any(s in value for s in FORBIDDEN), fld + ".value", f"contains one of the reserved tokens {FORBIDDEN}")
        prefix = f"<|im_start|>{role}\n"
        if role in ("assistant", "ignored"):
            need(any(r == "user" for r, _, _ in turns), fld, "a gpt turn before any human turn")
            need(role == "ignored" or value.strip() != "", fld + ".value", "empty gpt answer: nothing to learn",
                 "empty answer")
            value, c, n, a = _assistant_tools(value, registry, lambda ok, why, f=fld + ".value": need(ok, f, why))
            crops, auto = crops + [(x, fld + ".value") for x in c], auto + a
            calls.update(n)
            think = role == "ignored" or ("<think>" in value and "</think>" in value)
            prefix = "<|im_start|>assistant\n" + ("" if think else EMPTY_THINK)  # official: empty think inserted
        turns.append((role, prefix, value))
    ph, want = ("<video>", 1) if video else ("<image>", len(paths))
    n_ph = sum(v.count(ph) for r, _, v in turns if r in ("system", "user"))
    if want and n_ph == 0:  # LLaVA-style data without markers: the media open the first human turn
        u = next((i for i, (r, _, _) in enumerate(turns) if r == "user"), 0)
        turns[u], n_ph = (*turns[u][:2], f"{ph}\n" * want + turns[u][2]), want
    need(n_ph == want, "video" if video else "image", f"{want} {ph[1:-1]}s but {n_ph} {ph} placeholders in "
                                                      "system/human turns")
    need(paths or not crops, "image", "the sample calls an image tool but has no image for it")
    return turns, paths, crops, calls, auto


def _tokens_and_labels(turns: list, tokenizer, placeholder: str) -> tuple[list, list, list]:
    """Step 2: token ids turn by turn (chunk-wise around the placeholders, the official formatter's way) and the
    label mask. THE RULE of what is learned: a gpt turn's tokens after its role prefix (and after the empty think
    block inserted for it) through its <|im_end|>. Never learned: system, human and ignored_gpt turns, role
    prefixes, the inserted empty think, the "\\n" after <|im_end|>, visual placeholders, and tool results (a
    <tool_response>...</tool_response> span, an image tool's image): what the model did not write itself.
    Also returns, per placeholder in order, whether a gpt turn holds it (an image tool's result)."""
    texts = [p + v + "<|im_end|>\n" for _, p, v in turns] + [p for _, p, _ in turns]  # whole turns, then prefixes
    per_turn = ovis.tokenize_with_placeholders(texts, tokenizer, (placeholder,))
    tr_open, tr_close = tokenizer.convert_tokens_to_ids(["<tool_response>", "</tool_response>"])
    ids, labels, by_tool = [], [], []  # (L,), (L,) as lists; one flag per placeholder
    for (role, _, _), t_ids, p_ids in zip(turns, per_turn, per_turn[len(turns):]):
        by_tool += [role in ("assistant", "ignored") for i in t_ids if i in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)]
        lab = [IGNORE_ID] * len(t_ids)  # this turn's labels: nothing learned unless the rule says so
        inside = False  # within a <tool_response>...</tool_response> span
        if role == "assistant":  # after its role prefix (p_ids), through <|im_end|>, the "\n" after it excluded
            for j in range(len(p_ids), len(t_ids) - 1):
                inside = inside or t_ids[j] == tr_open
                lab[j] = IGNORE_ID if inside or t_ids[j] < 0 else t_ids[j]
                inside = inside and t_ids[j] != tr_close
        ids += t_ids
        labels += lab
    if turns[-1][0] == "assistant":  # the official formatter drops the last "\n"
        ids = ids[:-1]
        labels = labels[:-1]
    return ids, labels, by_tool


def _visuals(sample, owners: list, paths: list, image_dir, registry, b: Budgets, geo: dict, decode: bool, need):
    """Step 3: (pixels, grid) of each placeholder: an original image, the video (one grid [T, h, w]) or an image tool's
    result (the very call inference would run). decode=False: grids from image headers (or the tool's output_size)."""
    originals = b.originals(len(paths), "video" in sample or "video_frames" in sample)  # (min, max) pixels
    imgs = [_open(Path(image_dir) / p, decode, need) for p in paths]  # RGB images, or only (W, H) from headers
    decoded = imgs if decode else None  # the length pass decodes only for a tool that cannot size its result
    out = []  # (pixels, grid) per placeholder
    for x, fld in owners:
        budget = originals
        try:  # frames: PIL images, or (decode=False) their (W, H); an image is a one-frame video (model.py)
            if x == "video":
                frames = _video(sample, image_dir, b, decode, need)
            elif isinstance(x, int):  # an original image
                frames = [imgs[x]]
            else:  # an image tool's result
                budget = b.crop_min_pixels, b.crop_max_pixels
                size = None if decode else registry.get(x.name).output_size(x.args, imgs[0])
                if size is None:
                    decoded = decoded or [_open(Path(image_dir) / p, True, need) for p in paths]  # once a sample
                    res = registry.execute(x, decoded, paths)
                    if res.kind != "image":
                        raise ValueError(res.text)
                frames = [res.image] if decode else [size or res.image.size]
            if decode:
                pv, g = ovis.preprocess_video(frames, *budget, **geo)  # (N, 3 * ps * ps), (1, 3) = [t, h, w] patches
            else:  # the grid from the size alone (t: the number of frames), no pixels
                pv, g = None, ovis.image_grid(frames[0], *budget, **geo) * torch.tensor([[len(frames), 1, 1]])
        except SampleError:  # already names the sample and its field (a missing frame, say): as it is
            raise
        except ValueError as e:
            need(False, fld, f"cannot preprocess: {e}" if fld in ("image", "video") else f"{x.raw.strip()!r}: {e}")
        out.append((pv, g))
    return [p for p, _ in out], [g for _, g in out]


def encode_sample(sample: dict, tokenizer, image_dir=".", budgets: Budgets | None = None, *,
                  registry: tools.Registry | None = None, bbox_format: str = "pixel",
                  patch_size: int = ovis.ViTConfig.patch_size, hidden_stride: int = ovis.ViTConfig.hidden_stride,
                  with_pixels: bool = True, **overrides) -> dict:
    """One training sample (steps 1-4) -> {input_ids (L,), labels (L,), pixel_values (N, 3*ps*ps) | None, grid_thws
    (n, 3) | None, id, n_images, tool_calls, auto_crops, truncated} or a SampleError naming file, sample and field.
    `overrides`: Budgets fields; with_pixels=False reads only image headers (the length pass: same ids and grids)."""
    b = replace(budgets or Budgets(), **overrides)
    need = _need(sample)  # need(ok, field, why): a SampleError naming the file, the sample and the field
    registry = registry or tools.load_tools(bbox_format=bbox_format)
    turns, paths, crops, calls, auto = _render(sample, registry, need)
    need(any(r == "assistant" for r, _, _ in turns), "conversations", "no gpt turn: nothing to learn")
    video = "video" in sample or "video_frames" in sample
    ids, labels, by_tool = _tokens_and_labels(turns, tokenizer, "<video>" if video else "<image>")
    originals = iter([("video", "video")] if video else [(k, "image") for k in range(len(paths))])
    crop_it = iter(crops)  # the Crop calls of the gpt turns, in order
    owners = [next(crop_it) if t else next(originals) for t in by_tool]  # what fills each placeholder, its field
    geo = dict(patch_size=patch_size, hidden_stride=hidden_stride)
    pixels, grids = _visuals(sample, owners, paths, image_dir, registry, b, geo, with_pixels, need)  # per visual:
    # pixels (N_k, 3 * ps * ps) (None in the length pass), grids (1, 3) [t, h, w] in patches

    # Step 4: expand each placeholder to [start] + [atom] * n + [end] (unlearned); truncate, never inside a visual
    n_vis = iter([ovis.num_visual_tokens(g[0], hidden_stride) + 2 for g in grids])
    labels = [x for i, lab in zip(ids, labels) for x in ([IGNORE_ID] * next(n_vis) if i < -100 else [lab])]
    ids = ovis.expand_placeholders(ids, torch.cat(grids) if grids else None, hidden_stride)
    limit = b.max_length if (grids or b.text_max_length is None) else b.text_max_length
    n_full = len(ids)  # (L,) before truncation: `truncated` says whether it cut
    if limit is not None and len(ids) > limit:
        need(b.overlong == "truncate", "length", f"{len(ids)} tokens > max_length {limit} (overlong={b.overlong!r})")
        ids, labels, pixels, grids = truncate(ids, labels, pixels, grids, limit, hidden_stride)
    return {"id": sample.get("id", sample.get("_index")), "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels), "pixel_values": torch.cat(pixels) if with_pixels and pixels else None,
            "grid_thws": torch.cat(grids) if grids else None, "n_images": len(paths), "tool_calls": calls,
            "auto_crops": auto, "truncated": limit is not None and len(ids) < n_full}


def truncate(ids: list, labels: list, pixels: list, grids: list, max_length: int,
             hidden_stride: int = ovis.ViTConfig.hidden_stride):
    """The official truncation (spec 11.3): keep the first max_length tokens; a cut inside an image goes back to
    just after the last text token; only images whose atoms all survive keep their pixels (lists per image)."""
    ids, labels = ids[:max_length], labels[:max_length]
    if ids and ids[-1] in (VISUAL_ATOM_ID, ovis.INDICATOR_IDS[0], ovis.INDICATOR_IDS[2]):
        cut = max((j + 1 for j, i in enumerate(ids) if i >= 0), default=0)
        ids, labels = ids[:cut], labels[:cut]
    atoms, keep = ids.count(VISUAL_ATOM_ID), 0
    while keep < len(grids) and atoms >= ovis.num_visual_tokens(grids[keep][0], hidden_stride):
        atoms, keep = atoms - ovis.num_visual_tokens(grids[keep][0], hidden_stride), keep + 1
    return ids, labels, pixels[:keep], grids[:keep]


# --- Prompts (GRPO, eval, inference) from data samples; model.build_inputs renders them ---


def prompt_messages(sample: dict, image_dir=".", budgets: Budgets | None = None) -> list[dict]:
    """A sample's turns before its first gpt turn as chat messages (GRPO / eval prompts), validated and placed as in
    training; `<image>` / `<video>` become content items (a video: its frames, sampled as in training)."""
    need, video, head = _need(sample), "video" in sample or "video_frames" in sample, []
    for turn in sample.get("conversations") or []:  # the prompt: the turns before the first gpt turn
        if isinstance(turn, dict) and ROLES.get(turn.get("from")) in ("assistant", "ignored"):
            break
        head.append(turn)
    turns, paths, *_ = _render({**sample, "conversations": head}, tools.Registry(), need)
    media = iter([_video(sample, image_dir, budgets or Budgets(), True, need)] if video else
                 [str(Path(image_dir) / p) for p in paths])
    ph, msgs = "<video>" if video else "<image>", []
    for role, _, value in turns:
        content = [{"type": ph[1:-1], ph[1:-1]: next(media)} if p.startswith(ph) else {"type": "text", "text": p}
                   for p in re.split(f"({ph}\n?)", value) if p]
        msgs.append({"role": role, "content": content})
    return msgs


def load_prompts(paths: list[str], image_dir: str, bbox_format: str) -> list[dict]:
    """Samples with an image and a question; `answer` (str, number or list) and `bbox` ([x1, y1, x2, y2] in
    bbox_format) optional. A bad one raises SampleError naming the file, sample and field."""
    out = []
    for path in paths:
        for s in load_samples(path):
            need = _need(s)
            s.setdefault("conversations", [{"from": "human", "value": s["question"]}] if "question" in s else None)
            need(isinstance(s["conversations"], list) and any(isinstance(t, dict) and t.get("from") in ("human", "user")
                 for t in s["conversations"]), "conversations", "needs a human turn (or a `question` field)")
            imgs = [s["image"]] if isinstance(s.get("image"), str) else s.get("image")
            need(imgs and all(isinstance(i, str) and os.path.isfile(os.path.join(image_dir, i)) for i in imgs),
                 "image", f"missing or not found under {image_dir!r}: {s.get('image')!r}")
            bad = scoring.gold_problem(s, bbox_format)
            need(not bad, *(bad or ("", "")))
            out.append({**s, "_image_dir": image_dir})
    if not out:
        raise common.RunError(f"no prompts in {paths}")
    return out


# --- Training: dataset with counted skips, micro-batches of packed rows (common.plan_epoch), collation ---


class SFTDataset(torch.utils.data.Dataset):
    """Samples of files, encoded on access (**kw: encode_sample's). A length pass (image headers; decode=True: pixels)
    drops bad samples and ones without a learned token, by reason (`skipped`, `errors`); `lengths` feed plan_epoch."""

    def __init__(self, paths, tokenizer, image_dir=".", log=print, decode: bool = False, required: str = "", **kw):
        from tqdm import tqdm
        self.tokenizer, self.image_dir, self.kw, self.errors = tokenizer, image_dir, kw, []
        paths = [paths] if isinstance(paths, (str, Path)) else paths
        samples = [s for p in paths for s in load_samples(p, self.errors)]
        self.samples, self.lengths, self.stats = [], [], Counter()
        for s in tqdm(samples, desc="length pass", disable=len(samples) < 2000, file=sys.stderr):
            try:
                enc = encode_sample(s, tokenizer, image_dir, with_pixels=decode, **kw)
                if (enc["labels"] == IGNORE_ID).all():  # the official code keeps it; it would only dilute a step
                    raise SampleError(s["_file"], s["_index"], enc["id"], "labels", "no learned token left after "
                                      "truncation to max_length", "no learned token")
                self.lengths.append(len(enc["input_ids"]))
                self.samples.append(s)
                self.stats.update({"images": enc["n_images"], "old-format crops given their image": enc["auto_crops"],
                                   "truncated (overlong: truncate)": int(enc["truncated"]),
                                   **{f"calls {k}": v for k, v in enc["tool_calls"].items()}})
            except SampleError as e:
                self.errors.append(e)
        self.skipped = Counter(e.reason for e in self.errors)
        for e in self.errors[:10]:
            log(f"warning: skipping {e}")
        log(f"data: {len(self.samples)} samples, {sum(self.lengths)} tokens, {dict(self.stats)}; skipped "
            f"{len(self.errors)} {dict(self.skipped)}")
        if required and not self.samples:  # `required`: the run config key, named in the error
            raise common.RunError(f"{required}: no usable sample in {','.join(map(str, paths))} (skipped "
                                  f"{dict(self.skipped)}; python data.py check --data ... lists each bad one and why)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | None:
        try:
            return encode_sample(self.samples[i], self.tokenizer, self.image_dir, **self.kw)
        except SampleError as e:  # collate counts it (n_failed): the counter survives DataLoader workers
            print(f"warning: skipping {e}", file=sys.stderr)
            return None


def collate(rows: list[list[dict | None]]) -> dict:
    """Rows of encoded samples (None: failed at load) -> one packed micro-batch. pixel_values None: the model runs its
    zero-weighted dummy image (spec 13); position_ids restart at 0 per sample and padding: attention stays in each."""
    n_failed = sum(s is None for r in rows for s in r)
    rows = [[s for s in r if s is not None] for r in rows]
    rows = [r for r in rows if r] or [[]]
    T = max(1, max(sum(len(s["input_ids"]) for s in r) for r in rows))
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_ID, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        off = 0
        for s in row:
            n = len(s["input_ids"])
            ids[r, off:off + n], labels[r, off:off + n] = s["input_ids"], s["labels"]
            pos[r, off:off + n] = torch.arange(n)
            off += n
        pos[r, off:] = torch.arange(T - off)  # padding is a "sample" of its own
    vis = [s for r in rows for s in r if s["grid_thws"] is not None]
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "pixel_values": torch.cat([s["pixel_values"] for s in vis]) if vis else None,
            "grid_thws": torch.cat([s["grid_thws"] for s in vis]) if vis else None, "n_samples": sum(map(len, rows)),
            "n_failed": n_failed,  # a sample's first token is never a target (nothing before it)
            "n_target_tokens": int(((labels != IGNORE_ID) & (pos != 0)).sum())}


def micro_batches(dataset: SFTDataset, max_tokens: int, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                  seed: int = 0, epoch: int = 0, start_step: int = 0, num_workers: int = 0, fill: str = "repeat"):
    """The one packing route of training and eval -> (this rank's micro-batches, one packed row each, of one epoch
    from optimizer step `start_step` on; the epoch's number of steps). fill="empty": eval, every sample counts once.
    A sample longer than max_tokens is refused: a row holds whole samples, and max_tokens is what memory is sized by."""
    n, s = max(zip(dataset.lengths, dataset.samples), key=lambda pair: pair[0])  # the longest sample
    if n > max_tokens:
        raise common.RunError(f"max_tokens {max_tokens} is smaller than the longest sample ({s['_file']}:{s['_index']} "
                              f"id={s.get('id')}, {n} tokens): a packed row holds whole samples. Set max_tokens >= "
                              f"{n}, or max_length <= max_tokens to drop (overlong: drop) or cut (overlong: truncate) "
                              "the longer ones")
    plan = common.plan_epoch(dataset.lengths, max_tokens, world_size, grad_accum, seed, epoch, fill)
    mine = [mb for step in plan[start_step:] for mb in step[rank::world_size]]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, collate_fn=collate_row, num_workers=num_workers)
    return loader, len(plan)


def collate_row(samples: list[dict | None]) -> dict:  # a module-level function: DataLoader workers pickle it
    return collate([samples])


if __name__ == "__main__":  # `python data.py check ...`: the checker lives in data_check.py (it builds on this module)
    import data_check

    data_check.cli(sys.argv[1:])
