"""Synthetic "think with images" data: pictures with a small coloured target that needs a Crop to be seen well,
plus named objects for Identify. Writes images, an SFT file with tool-calling conversations, a GRPO/eval file
(question + `answer` + ground-truth `bbox`, no assistant turn) and the Identify map.

    python data/make_synthetic.py --out data/demo --n 24 --seed 0
    python data/make_synthetic.py --out data/demo --grounding 128 64 --seed 1    # the GRPO demo's grounding set

Boxes are pixels of the original image (bbox_format "pixel", the seed's convention).
"""

import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tools  # noqa: E402

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190), "orange": (240, 140, 30)}
OBJECTS = ("circle", "square", "triangle")


def draw_shape(d: ImageDraw.ImageDraw, kind: str, box, color):
    x1, y1, x2, y2 = box
    if kind == "circle":
        d.ellipse(box, fill=color)
    elif kind == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(x1, y2), ((x1 + x2) // 2, y1), (x2, y2)], fill=color)


def make_image(rng: random.Random, w=320, h=240):
    """Background gradient + noise, two large distractors, one small target (12-18 px) somewhere else."""
    img = Image.new("RGB", (w, h))
    px = img.load()
    base = [rng.randint(60, 200) for _ in range(3)]
    for y in range(h):
        for x in range(w):
            px[x, y] = tuple(min(255, max(0, b + (x - y) // 6 + rng.randint(-12, 12))) for b in base)
    d = ImageDraw.Draw(img)
    objects = []
    for _ in range(2):
        s = rng.randint(50, 80)
        x, y = rng.randint(0, w - s - 1), rng.randint(0, h - s - 1)
        kind, color = rng.choice(OBJECTS), rng.choice(list(COLORS))
        draw_shape(d, kind, (x, y, x + s, y + s), COLORS[color])
        objects.append({"bbox": [x, y, x + s, y + s], "name": f"{color} {kind}"})
    while True:  # the target must not overlap the distractors
        s = rng.randint(12, 18)
        x, y = rng.randint(4, w - s - 5), rng.randint(4, h - s - 5)
        if all(tools.iou([x, y, x + s, y + s], o["bbox"]) == 0 for o in objects):
            break
    color = rng.choice(list(COLORS))
    draw_shape(d, "square", (x, y, x + s, y + s), COLORS[color])
    target = {"bbox": [x, y, x + s, y + s], "name": f"{color} square", "color": color}
    return img, objects, target


def crop_box(target, pad, w, h):
    x1, y1, x2, y2 = target["bbox"]
    return [max(0, x1 - pad), max(0, y1 - pad), min(w, x2 + pad), min(h, y2 + pad)]


GROUND_COLORS = ("red", "green", "blue", "yellow")  # four far-apart colours: a tiny model tells them apart quickly
SPOTS = {"top left": (32, 32), "top right": (96, 32), "bottom left": (32, 64), "bottom right": (96, 64)}
# a grounding picture's four squares (top-left corners), on the 32 px grid of the visual tokens (patch 16 x merge 2):
# each square is one visual token of the picture and four of its crop


def grounding_image(rng: random.Random, w=160, h=128, side=32, grain=4):
    """A noisy background of `grain` px blocks (small PNGs) and four squares of four different colours, one at each of
    SPOTS, seen whole at the demo's pixel budget (160 x 128 = 20480 px: no resize). Returns the picture and
    {place: colour}."""
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    base = [rng.randint(70, 190) for _ in range(3)]
    for y in range(0, h, grain):
        for x in range(0, w, grain):
            noisy = tuple(min(255, max(0, b + rng.randint(-20, 20))) for b in base)
            d.rectangle((x, y, x + grain - 1, y + grain - 1), fill=noisy)
    colors = dict(zip(SPOTS, rng.sample(GROUND_COLORS, len(SPOTS))))
    for place, (x, y) in SPOTS.items():
        d.rectangle((x, y, x + side - 1, y + side - 1), fill=COLORS[colors[place]])
    return img, colors


def grounding(out: str, n_train: int, n_eval: int, rng: random.Random, system: str, place="top left", side=32):
    """The GRPO demo's task: "what colour is the square at the top left?" in pictures of four squares. The SFT file
    teaches the tool format and to answer with the colour the crop shows, its Crop on one of the four squares at
    random: right one time in four. The GRPO and held-out prompts carry the gold colour and box, so what GRPO has to
    learn is where to look, and it shows in the held-out crop IoU and accuracy."""
    q = f"What color is the square at the {place}? Crop it first, then answer with one word."
    x, y = SPOTS[place]
    gold = [x, y, x + side, y + side]
    sft, prompts = [], []
    os.makedirs(os.path.join(out, "ground"), exist_ok=True)
    for i in range(n_train + n_eval):
        img, colors = grounding_image(rng, side=side)
        name = f"ground/g_{i:03d}.png"
        img.save(os.path.join(out, name))
        turns = [{"from": "system", "value": system}, {"from": "human", "value": f"<image>\n{q}"}]
        prompts.append({"id": f"ground_{i:03d}", "image": name, "answer": colors[place], "bbox": gold,
                        "conversations": turns})
        if i < n_train:
            seen = rng.choice(list(SPOTS))
            sx, sy = SPOTS[seen]
            c = colors[seen]
            reply = (f"<think>\nLet me zoom in. <tool_call>Crop [{sx}, {sy}, {sx + side}, {sy + side}]</tool_call>"
                     f"<image>\nIt is {c}.\n</think>\n\n<answer>{c}</answer>")
            sft.append({"id": f"ground_sft_{i:03d}", "image": name,
                        "conversations": turns + [{"from": "gpt", "value": reply}]})
    for fn, obj in (("ground/sft.json", sft), ("ground/grpo.json", prompts[:n_train]),
                    ("ground/eval.json", prompts[n_train:])):
        with open(os.path.join(out, fn), "w") as f:
            json.dump(obj, f, indent=1)
    print(f"wrote {len(sft)} grounding SFT samples, {n_train} GRPO and {n_eval} held-out prompts to {out}/ground")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grounding", nargs=2, type=int, metavar=("N_TRAIN", "N_EVAL"),
                    help="write the GRPO demo's grounding set (out/ground) instead")
    a = ap.parse_args(argv)
    if a.grounding:
        return grounding(a.out, *a.grounding, random.Random(a.seed), tools.load_tools(bbox_format="pixel")
                         .system_prompt())
    rng = random.Random(a.seed)
    os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
    system = tools.load_tools(bbox_format="pixel").system_prompt()
    sft, grpo, identify_map = [], [], {}
    for i in range(a.n):
        img, objects, target = make_image(rng)
        name = f"images/syn_{i:03d}.png"
        img.save(os.path.join(a.out, name))
        identify_map[name] = objects + [{"bbox": target["bbox"], "name": target["name"]}]
        box = crop_box(target, rng.randint(6, 14), img.width, img.height)
        q = "What color is the small square in the image?"
        sft.append({"id": f"crop_{i:03d}", "image": name, "conversations": [
            {"from": "system", "value": system},
            {"from": "human", "value": f"<image>\n{q}"},
            {"from": "gpt", "value": f"<think>\nThe square is small, I will zoom in on it. <tool_call>Crop "
                                     f"[{', '.join(str(v) for v in box)}]</tool_call><image>\nThe crop shows a "
                                     f"{target['color']} square.\n</think>\n\n<answer>{target['color']}</answer>"}]})
        obj = objects[i % len(objects)]
        ob = ", ".join(str(v) for v in obj["bbox"])
        answer = (f"<think>\nLet me identify it. <tool_call>Identify [{ob}]</tool_call><tool_response>{obj['name']}"
                  f"</tool_response>\n</think>\n\n<answer>{obj['name']}</answer>")
        sft.append({"id": f"identify_{i:03d}", "image": name, "conversations": [
            {"from": "system", "value": system},
            {"from": "human", "value": f"<image>\nWhat is the object in the region [{ob}]?"},
            {"from": "gpt", "value": answer}]})
        grpo.append({"id": f"grpo_{i:03d}", "image": name, "answer": target["color"], "bbox": target["bbox"],
                     "conversations": [{"from": "system", "value": system},
                                       {"from": "human", "value": f"<image>\n{q} Answer with one word."}]})
    for fn, obj in (("sft.json", sft), ("grpo.json", grpo), ("identify_map.json", identify_map)):
        with open(os.path.join(a.out, fn), "w") as f:
            json.dump(obj, f, indent=1)
    print(f"wrote {len(sft)} SFT samples, {len(grpo)} GRPO samples, {a.n} images to {a.out}")


if __name__ == "__main__":
    main()
