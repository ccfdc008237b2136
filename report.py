"""Rollout reports: what the model thought, which boxes it cropped and what it earned, readable in a browser. GRPO's
rank 0 writes a few rollouts every `log_rollouts_interval` steps and at every eval (`write_step`); `infer.py --report`
writes one page of the same kind for an inference or eval run (`write_inference_report`: one section, a row per
record, the crops recomputed from the image, nothing but the page written).

Files of a training run (relative to out_dir, e.g. output_dir/rollouts):
    step_N.jsonl, eval_step_N.jsonl  one row a rollout (`rollout_row`): prompt, thinking, text, answer, tool calls
                                     {name, args, ok, result}, gold answer / bbox, each reward, the weighted reward,
                                     advantage, length, finish, image size, bbox format, crop files, image copy
    crops/<sha1>.png                 each crop a tool returned, named by its pixels (equal crops share one file);
                                     lossless, downscaled only beyond COPY_SIDE px a side
    images/<sha1>.jpg                the prompt image, downscaled to COPY_SIDE px a side at most
    index.html                       rebuilt from the step files present after every write
    sections/<sha1>.html             each step file's part of the page, rendered once (a cache)
Each file is written under a temporary name and renamed, so a reader, a resumed run or a second writer never meets a
torn file; the page is rebuilt until the step files it was built from are still the ones present.

The page is self-contained (images are data: URIs, no script, no external URL): a header with the legend, then per
step file, newest first (at one step the eval comes first: it ran after that step's update), one row a rollout. Left:
the prompt image shown DISPLAY_WIDTH px wide inside an inline SVG whose coordinates are the original image's pixels,
over it each Crop call's box in PRED (numbered as the call, dashed when the call failed) and the gold box in GOLD, from
the row's bbox_format by tools.to_pixels (a box that is no box is listed, not drawn); the crops below it. Right:
rewards and advantage, answer and gold, the tool calls, the prompt and the text, all HTML-escaped. The heights above
the first image are fixed (FIRST_IMAGE_AT), so where a box lands on screen is computable. Size: images at most
DISPLAY_WIDTH px wide and crops CROP_SIDE px a side, as JPEG (some 30-80 kB a row); the page shows the newest
PAGE_STEPS step files and links the older ones.
"""

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import uuid
from pathlib import Path

from PIL import Image

import evalsets
import tools

PRED, GOLD = "#ff00ff", "#00c800"  # predicted Crop boxes, the gold box: pure colours, unlike photos and each other
DISPLAY_WIDTH = 512  # px: every prompt image is shown this wide, so a box lands at a computable place
CROP_SIDE = 256  # px: the crops embedded at most this a side, shown half as high (sharp on a 2x screen)
COPY_SIDE = 1024  # px: image copies and crop files, at most this a side (the model saw a crop at <= 896 x 896)
PAGE_STEPS = 30  # step files shown in full (the newest); older ones are linked, so that the page stays small
PAD, HEADER_H, STEP_H, ROW_PAD = 16, 96, 32, 12  # px: the page's margin and the fixed heights above the first image
FIRST_IMAGE_AT = (PAD, HEADER_H + STEP_H + ROW_PAD)  # CSS px: top-left corner of the first row's image
STEP_FILE = re.compile(r"(eval_)?step_(\d+)\.jsonl")

CSS = f"""body{{margin:0;padding:0 {PAD}px;font:14px/1.35 sans-serif;color:#222;background:#fff}}
header{{height:{HEADER_H}px;overflow:hidden;box-sizing:border-box;padding-top:8px}}
h1{{font-size:20px;margin:0 0 6px}} header p{{margin:2px 0}}
.sw{{display:inline-block;width:22px;height:12px;border:3px solid;vertical-align:middle;margin:0 4px}}
section{{margin:0;padding:0}}
h2{{height:{STEP_H}px;line-height:{STEP_H}px;margin:0;padding:0 8px;font-size:16px;overflow:hidden;background:#eee}}
.row{{display:flex;gap:16px;align-items:flex-start;padding:{ROW_PAD}px 0;border-bottom:1px solid #ccc}}
.fig{{flex:0 0 {DISPLAY_WIDTH}px;width:{DISPLAY_WIDTH}px}} .info{{flex:1;min-width:0}}
svg.main{{display:block;background:#ddd}}
svg.main rect{{fill:none;stroke-width:3px;vector-effect:non-scaling-stroke}}
.crops{{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}} figure{{margin:0}}
figure img{{display:block;height:{CROP_SIDE // 2}px;width:auto;max-width:{DISPLAY_WIDTH}px;border:1px solid #999}}
table{{border-collapse:collapse;margin:0 0 8px}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;
vertical-align:top}} th{{background:#f4f4f4}}
pre{{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:6px;margin:4px 0;max-height:32em;
overflow:auto}}
mark{{background:#ffe9a8}} .error{{color:#b00}} details{{margin:4px 0}}"""


def rollout_row(rollout, sample: dict, *, rewards: dict, advantage: float | None, step: int,
                image_path: str | None, prompt_text: str, reward: float | None = None) -> dict:
    """A tools.Rollout of `sample` -> its JSON row. `rewards`: each reward's value, `reward`: their weighted sum,
    `advantage`: None at eval; a non-finite number is written as null. The crops' file names are their content's
    (write_step saves them under these names); `image_path`: the prompt image as the sample names it."""
    return {"step": step, "id": sample.get("id"), "prompt": prompt_text, "image": image_path,
            "image_size": list(rollout.image_size) if rollout.image_size else None,
            "bbox_format": rollout.bbox_format, "thinking": rollout.thinking, "answer": rollout.answer,
            "text": rollout.text, "tool_calls": rollout.tool_calls,
            "crops": [f"crops/{_digest(c)}.png" for c in rollout.crops],
            "gold_answer": sample.get("answer"), "gold_bbox": sample.get("bbox"),
            "rewards": {k: _finite(v) for k, v in rewards.items()}, "reward": _finite(reward),
            "advantage": _finite(advantage), "length": rollout.n_generated, "finish": rollout.finish}


def prompt_text(sample: dict) -> str:
    """The question of a sample or request: its `prompt`, else its last user turn before the first answer."""
    if isinstance(sample.get("prompt"), str):
        return sample["prompt"]
    if isinstance(sample.get("messages"), list):
        users = [m.get("content") for m in sample["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users else ""
        items = [last] if isinstance(last, str) else [i.get("text", "") for i in last if isinstance(i, dict)]
        return "".join(items)
    said = ""
    for turn in sample.get("conversations") or []:
        if turn.get("from") in ("gpt", "assistant"):
            break
        said = turn.get("value", "") if turn.get("from") in ("human", "user") else said
    return said


def write_step(out_dir, step: int, rows_with_images: list, kind: str = "train") -> Path:
    """One step's rows [(rollout_row, prompt image or None, rollout.crops)] -> out_dir/step_N.jsonl (eval:
    eval_step_N.jsonl) with each row's `image_file` (the image copy), the crop files, the copies; then index.html is
    rebuilt. Returns the jsonl's path."""
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    out, rows = Path(out_dir), []
    for row, image, crops in rows_with_images:
        if len(crops) != len(row["crops"]):
            raise ValueError(f"row {row.get('id')!r} names {len(row['crops'])} crops, {len(crops)} given")
        for name, crop in zip(row["crops"], crops):
            _save(out / name, crop, "PNG")
        copy = None if image is None else f"images/{_digest(image)}.jpg"
        if copy:
            _save(out / copy, image, "JPEG")
        rows.append({**row, "image_file": copy})
    path = out / f"{'eval_' if kind == 'eval' else ''}step_{step}.jsonl"
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode())
    build_index(out)
    return path


def write_groups(out_dir, step: int, groups: list, advantages, count: int, kind: str = "train",
                 trackers=None) -> Path | None:
    """GRPO's scored groups ({sample, rolls, parts {reward: (G,)}, reward (G,)}, grpo.score) and their (P*G,)
    advantages (None at eval) -> write_step of the first rollout of each group, then the second..., `count` in all;
    also to tensorboard / wandb when `trackers` (common.Metrics) has them."""
    if not groups or count <= 0:
        return None
    n = len(groups[0]["rolls"])
    picked = sorted((i, g) for g in range(len(groups)) for i in range(n))[:count]  # (completion, group)
    rows = []
    for i, gi in picked:
        g, r = groups[gi], groups[gi]["rolls"][i]
        sample = g["sample"]
        key = sample["image"] if isinstance(sample.get("image"), str) else (sample.get("image") or [None])[0]
        image = _open(os.path.join(sample.get("_image_dir", "."), key)) if key else None
        row = rollout_row(r, sample, rewards={k: float(v[i]) for k, v in g["parts"].items()},
                          advantage=None if advantages is None else float(advantages[gi * n + i]), step=step,
                          image_path=key, prompt_text=prompt_text(sample), reward=float(g["reward"][i]))
        rows.append((row, image, r.crops))
    to_trackers(trackers, step, rows, kind)
    return write_step(out_dir, step, rows, kind)


def boxes_drawn(image: Image.Image, row: dict) -> Image.Image:
    """A copy of the prompt image with each predicted Crop box (PRED) and the gold box (GOLD) drawn on it: what the
    page shows, as one picture for tensorboard / wandb."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    for box, colour, _, _ in _boxes(row)[0]:
        pen.rectangle(box, outline=colour, width=max(2, out.width // 200))
    return out


def to_trackers(metrics, step: int, rows_with_images: list, kind: str = "train") -> None:
    """With tensorboard / wandb on (common.Metrics): the rows as images with their boxes drawn and their text
    (tensorboard), or one table (wandb), under rollouts_<kind>."""
    shown = [(row, boxes_drawn(image, row)) for row, image, _ in rows_with_images if image is not None]
    if metrics is None or not shown:
        return
    caption = lambda r: (f"{r['id']}: answer {r['answer']!r} (gold {r['gold_answer']!r}), reward "  # noqa: E731
                         f"{r['reward']}, advantage {r['advantage']}, {len(r['tool_calls'])} calls")
    if metrics.tb is not None:
        import numpy as np

        for k, (row, image) in enumerate(shown):
            metrics.tb.add_image(f"rollouts_{kind}/{k}", np.asarray(image), step, dataformats="HWC")
            metrics.tb.add_text(f"rollouts_{kind}/{k}", caption(row) + "\n\n    " + row["text"], step)
    if metrics.wb is not None:
        import wandb

        table = wandb.Table(columns=["rollout", "image", "text"])
        for row, image in shown:
            table.add_data(caption(row), wandb.Image(image), row["text"])
        metrics.wb.log({f"rollouts_{kind}": table}, step=step)


def drop_after(out_dir, step: int) -> None:
    """A resumed run: remove the step files after its checkpoint's `step` (as metrics.jsonl drops its records)."""
    out = Path(out_dir)
    for s, _, name in _step_files(out):
        if s > step:
            (out / name).unlink(missing_ok=True)
    if out.is_dir():
        build_index(out)


def read_rows(path) -> list[dict]:
    """The rows of a step file (or any JSONL)."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def build_index(out_dir) -> Path:
    """Rebuild out_dir/index.html from the step files present, newest first; again if they changed meanwhile (another
    writer), so the page last renamed into place shows every step file. A step file's part of the page is rendered
    once and kept in sections/ under the hash of its name and content; parts no step file has any more are removed."""
    out = Path(out_dir)
    while True:
        seen = _signature(out)
        files = _step_files(out)
        parts = [_section(out, name, f"step {s} \u00b7 {'eval' if ev else 'train'}") for s, ev, name in
                 files[:PAGE_STEPS]]
        note = f"{len(files)} step file{'s' * (len(files) != 1)}, newest first" + (
            f"; the newest {PAGE_STEPS} shown" if files[PAGE_STEPS:] else "")
        page = _page(f"Rollouts: {out.resolve().parent.name}", note, [part for _, part in parts],
                     [n for *_, n in files[PAGE_STEPS:]])
        _write_atomic(out / "index.html", page.encode())
        if _signature(out) == seen:
            break
    for p in (out / "sections").glob("*.html"):
        if p.name not in {key for key, _ in parts}:
            p.unlink(missing_ok=True)
    return out / "index.html"


def write_inference_report(out_html, requests: list, records: list, image_dir: str = ".",
                           bbox_format: str = "pixel", title: str = "", max_rows: int = 300) -> Path:
    """One page for an infer.py run: a row per record (infer.record's id, answer, thinking, text, tool_calls,
    n_generated, finish, scores; error records too), in their order, the first `max_rows` (the page stays small); gold
    from the request of the same id (`answer`, `bbox` in bbox_format; a --bench request's `bench` answer, with the
    choice read from the record and whether it is right, as evalsets scores it). The image is read again (request paths:
    relative to image_dir, messages' as written) and each Crop call's crop recomputed from it (tools.crop_box), so
    that records stay small."""
    by_id = {r.get("id"): r for r in requests}
    rows = []
    for rec in records[:max_rows]:
        req = by_id.get(rec.get("id"), {})
        bench = req.get("bench")  # a --bench request keeps its gold letter here, and its records carry no scores
        judged = evalsets.score_record(req, rec) if bench and "error" not in rec else None
        path = _request_image(req, image_dir)
        image = _open(path) if path else None
        row = {"id": rec.get("id"), "prompt": prompt_text(req), "image": path,
               "image_size": list(image.size) if image else None, "bbox_format": bbox_format,
               "thinking": rec.get("thinking", ""), "answer": rec.get("answer", ""), "text": rec.get("text", ""),
               "tool_calls": rec.get("tool_calls", []), "gold_bbox": req.get("bbox"),
               "gold_answer": _option(bench, bench["answer"]) if bench else req.get("answer"),
               "choice": _option(bench, judged["choice"]) if judged else None,
               "rewards": rec.get("scores") or ({"correct": float(judged["correct"])} if judged else {}),
               "reward": None, "advantage": None, "length": rec.get("n_generated"), "finish": rec.get("finish"),
               "error": rec.get("error")}
        crops = [(j + 1, image.crop(tools.crop_box(c["args"], image.size, bbox_format)))
                 for j, c in enumerate(row["tool_calls"]) if image and c["ok"] and c["name"].lower() == "crop"]
        rows.append((row, image, crops))
    out = Path(out_html)
    note = (f"{len(records)} records" + (f", the first {max_rows} shown" if len(records) > max_rows else "")
            + "; crops recomputed from the images and the calls' boxes")
    page = _page(title or f"Inference: {out.stem}", note, [_section_html("records", "records", rows)])
    _write_atomic(out, page.encode())
    return out


def _option(bench: dict, letter: str | None) -> str:
    """A benchmark option as the page shows it: "B (a red car)"; no letter: the answer named none."""
    return f"{letter} ({bench['options'][letter]})" if letter else "none (unparsed)"


# ----------------------------------------------------------------------------------------------------------------
# files

def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _digest(img: Image.Image) -> str:
    return hashlib.sha1(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()[:20]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a name of this writer's own, then rename: a reader sees the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save(path: Path, img: Image.Image, fmt: str) -> None:
    if path.exists():  # named by content: it is this image already
        return
    buf = io.BytesIO()
    _fit(img, COPY_SIDE, COPY_SIDE).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    _write_atomic(path, buf.getvalue())


def _fit(img: Image.Image, w: int, h: int) -> Image.Image:
    """An RGB copy no larger than w x h, aspect kept."""
    img = img.convert("RGB")
    if img.width > w or img.height > h:
        img.thumbnail((w, h), Image.Resampling.LANCZOS)
    return img


def _open(path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError):  # a missing or broken file: the row is shown without its image
        return None


def _request_image(req: dict, image_dir: str) -> str | None:
    """The first image of a request as infer.py opens it: `image` under image_dir, a messages' image as written."""
    if isinstance(req.get("messages"), list):
        items = [i for m in req["messages"] if isinstance(m, dict) and isinstance(m.get("content"), list)
                 for i in m["content"] if isinstance(i, dict) and i.get("type") == "image"]
        return items[0]["image"] if items and isinstance(items[0].get("image"), str) else None
    first = req.get("image")
    first = first[0] if isinstance(first, list) and first else first
    return os.path.join(image_dir, first) if isinstance(first, str) and first else None


def _step_files(out: Path) -> list[tuple[int, bool, str]]:
    """(step, is_eval, name) of the step files, newest first; at one step the eval first (it ran after the update)."""
    found = [(int(m.group(2)), bool(m.group(1)), m.group(0)) for p in (out.iterdir() if out.is_dir() else ())
             if (m := STEP_FILE.fullmatch(p.name))]
    return sorted(found, reverse=True)


def _signature(out: Path) -> list:
    """What tells a rewrite: a rename gives the file a new inode."""
    return [(name, (out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for *_, name in _step_files(out)]


def _section(out: Path, name: str, heading: str) -> tuple[str, str]:
    """(cache file name, HTML) of a step file's section: rendered (images decoded, scaled, encoded) only once."""
    data = (out / name).read_bytes()
    key = hashlib.sha1(name.encode() + b"\0" + data).hexdigest()[:20] + ".html"
    try:
        return key, (out / "sections" / key).read_text(encoding="utf-8")
    except FileNotFoundError:  # new content (or another writer just removed it: render it again)
        part = _section_html(heading, name[:-6], _load_rows(out, data.decode("utf-8")))
        _write_atomic(out / "sections" / key, part.encode())
        return key, part


def _load_rows(out: Path, text: str) -> list:
    """A step file's rows with their images, read back from the copies and crop files."""
    rows = []
    for row in (json.loads(x) for x in text.splitlines() if x.strip()):
        image = _open(out / row["image_file"]) if row.get("image_file") else None
        shown = [j + 1 for j, c in enumerate(row["tool_calls"]) if c["ok"] and c.get("result") is None]  # image results
        crops = [(j, _open(out / f)) for j, f in zip(shown, row["crops"])]
        rows.append((row, image, [(j, c) for j, c in crops if c is not None]))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# the page

def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _num(x) -> str:
    return "\u2013" if x is None else f"{x:.4g}"


def _data_uri(img: Image.Image, w: int, h: int) -> str:
    buf = io.BytesIO()
    _fit(img, w, h).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _page(title: str, note: str, sections: list, older: list = ()) -> str:
    """The whole page around its sections' HTML; `older`: step files linked, not shown."""
    legend = (f'<span class="sw" style="border-color:{PRED}"></span>predicted Crop box (numbered as its call; dashed: '
              f'the call failed) <span class="sw" style="border-color:{GOLD}"></span>gold box')
    body = [f"<header><h1>{_esc(title)}</h1><p>{legend}</p><p>{_esc(note)}</p></header>", *sections]
    if older:
        links = ", ".join(f'<a href="{_esc(n)}">{_esc(n)}</a>' for n in older)
        body.append(f"<p>Older step files, not shown: {links}</p>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _section_html(heading: str, anchor: str, rows: list) -> str:
    """rows: [(row, image or None, [(call number, crop)])]."""
    rewards = [r["reward"] for r, *_ in rows if r.get("reward") is not None]
    mean = f" \u00b7 mean reward {_num(sum(rewards) / len(rewards))}" if rewards else ""
    count = f"{len(rows)} row" + "s" * (len(rows) != 1)
    return (f'<section id="{_esc(anchor)}"><h2>{_esc(heading)} \u00b7 {count}{mean}</h2>'
            + "".join(_row_html(*r) for r in rows) + "</section>")


def _boxes(row: dict) -> tuple[list, dict]:
    """Boxes to draw [(pixel box, colour, label, dashed)] and what the calls table says of each box, by call number
    ("gold" for the gold box): its pixel box, or why it is not drawn."""
    size, fmt, draw, said = row.get("image_size"), row.get("bbox_format") or "pixel", [], {}
    marked = [("gold", row.get("gold_bbox"), GOLD, "", False)] if row.get("gold_bbox") is not None else []
    marked += [(j + 1, c["args"], PRED, str(j + 1), not c["ok"]) for j, c in enumerate(row["tool_calls"])
               if str(c.get("name")).lower() == "crop"]
    for key, box, colour, label, dashed in marked:
        try:
            px = tools.to_pixels(box, size, fmt) if size else None
        except ValueError as e:
            said[key] = f"not drawn: {e}"
            continue
        if px is None:
            said[key] = "not drawn: no image"
            continue
        draw.append((px, colour, label, dashed))
        said[key] = "[" + ", ".join(f"{v:.0f}" for v in px) + "]"
    return draw, said


def _figure(row: dict, image, boxes: list) -> str:
    """The image DISPLAY_WIDTH px wide, an SVG overlay in the original's pixels (viewBox): boxes land where they are."""
    if not row.get("image_size"):
        return "<p>no image</p>"
    w, h = row["image_size"]
    k = w / DISPLAY_WIDTH  # original px per screen px: labels keep their screen size
    out = [f'<svg class="main" width="{DISPLAY_WIDTH}" height="{round(DISPLAY_WIDTH * h / w)}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="image with boxes">']
    if image is not None:
        out.append(f'<image href="{_data_uri(image, DISPLAY_WIDTH, 4 * DISPLAY_WIDTH)}" x="0" y="0" width="{w}" '
                   f'height="{h}" preserveAspectRatio="none"/>')
    for (x1, y1, x2, y2), colour, label, dashed in boxes:
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<rect x="{x1:g}" y="{y1:g}" width="{x2 - x1:g}" height="{y2 - y1:g}" stroke="{colour}"{dash}/>')
        if label:
            out.append(f'<text x="{x1 + 4 * k:g}" y="{y1 + 15 * k:g}" font-size="{14 * k:g}" font-weight="bold" '
                       f'fill="{colour}">{label}</text>')
    return "".join(out) + "</svg>"


def _table(head: list, rows: list) -> str:
    """A table of escaped cells: a header row, then `rows`."""
    cells = [f"<tr>{''.join(f'<th>{_esc(h)}</th>' for h in head)}</tr>"]
    cells += [f"<tr>{''.join(f'<td>{_esc(v)}</td>' for v in r)}</tr>" for r in rows]
    return f"<table>{''.join(cells)}</table>"


def _row_html(row: dict, image, crops: list) -> str:
    boxes, said = _boxes(row)
    crop_html = "".join(f'<figure><img src="{_data_uri(c, CROP_SIDE, CROP_SIDE)}" alt="crop of call {j}">'
                        f"<figcaption>call {j}: {c.width}x{c.height}</figcaption></figure>" for j, c in crops)
    fig = _figure(row, image, boxes) + (f'<div class="crops">{crop_html}</div>' if crops else "")
    gold = row.get("gold_bbox")
    facts = [("id", row.get("id")), ("answer", row.get("answer")), ("choice", row.get("choice")),
             ("gold answer", row.get("gold_answer")),
             ("gold box", None if gold is None else f"{gold} \u2192 {said['gold']}"),
             ("length", row.get("length")), ("finish", row.get("finish")), ("image", row.get("image")),
             ("size, boxes", row.get("image_size") and f"{row['image_size']}, {row.get('bbox_format')}")]
    info = [f'<p class="error">error: {_esc(row["error"])}</p>'] if row.get("error") else []
    info.append("<table>" + "".join(f"<tr><th>{k}</th><td>{_esc(v)}</td></tr>" for k, v in facts if v is not None)
                + "</table>")
    scores = list(row.get("rewards", {}).items()) + [(k, row[k]) for k in ("reward", "advantage")
                                                     if row.get(k) is not None]  # (none at eval / inference)
    if scores:
        info.append(_table([k for k, _ in scores], [[_num(v) for _, v in scores]]))
    calls = [(j + 1, c.get("name"), json.dumps(c.get("args")), "ok" if c.get("ok") else "error",
              "image" if c.get("result") is None else c["result"], said.get(j + 1, ""))
             for j, c in enumerate(row.get("tool_calls", []))]
    if calls:
        info.append(_table(["#", "tool", "args", "ok", "result", "box (px)"], calls))
    marked = re.sub(r"(&lt;tool_call&gt;.*?&lt;/tool_call&gt;)", r"<mark>\1</mark>", _esc(row.get("text")),
                    flags=re.DOTALL)  # on the escaped text: the model's own text cannot open a tag
    info.append(f"<details><summary>prompt</summary><pre>{_esc(row.get('prompt'))}</pre></details><pre>{marked}</pre>")
    return f'<div class="row"><div class="fig">{fig}</div><div class="info">{"".join(info)}</div></div>'


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl -> curves (`python report.py curves out/demo_grpo`; matplotlib, imported only here)


CURVES = ("reward", "accuracy", "mean_crop_iou", "tool_rate", "valid_crop_rate", "response_len")
RATES = ("accuracy", "mean_crop_iou", "tool_rate", "valid_crop_rate", "format_rate", "answer_rate")


def curves(run_dir, out_png=None, keys: tuple = CURVES) -> Path:
    """A run's metrics.jsonl -> one PNG: a panel per metric, the training steps as a line and the held-out evals
    (eval_<metric>) as points on it. Returns the PNG's path (default: run_dir/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    keys = [k for k in keys if any(r.get(k) is not None or r.get(f"eval_{k}") is not None for r in recs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        train = [(r["step"], r[k]) for r in recs if r.get(k) is not None]
        held = [(r["step"], r[f"eval_{k}"]) for r in recs if r.get(f"eval_{k}") is not None]
        if train:
            ax.plot(*zip(*train), color="#1f77b4", lw=1.2, label="train")
        if held:
            ax.plot(*zip(*held), "o-", color="#d62728", ms=4, lw=1, label="eval")
        if k in RATES:  # shares on one fixed scale: a dip from 1.0 to 0.97 must not fill the panel
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png or Path(run_dir) / "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (3, 4) or sys.argv[1] != "curves":
        sys.exit("usage: python report.py curves RUN_DIR [OUT.png]")
    print(curves(*sys.argv[2:]))

