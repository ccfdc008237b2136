"""Synthetic "think with images" data: pictures with a small coloured target that needs a Crop to be seen well,
plus named objects for Identify. Writes images, an SFT file with tool-calling conversations, a GRPO/eval file
(question + `answer` + ground-truth `bbox`, no assistant turn) and the Identify map.

    python data/make_synthetic.py --out data/demo --n 24 --seed 0
    python data/make_synthetic.py --out data/demo --grounding 64 16 --seed 1     # the GRPO demo's grounding set

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


SPOTS = ((16, 16), (112, 16), (16, 80), (112, 80))  # where a grounding picture's square sits (its top-left corner)


def grounding_image(rng: random.Random, w=160, h=128, side=32):
    """The grounding task of the GRPO demo: a noisy background and one coloured square at one of SPOTS, seen whole
    at the demo's pixel budget (160 x 128 = 20480 px: no resize). Where it is, is what a Crop must find."""
    img = Image.new("RGB", (w, h))
    px = img.load()
    base = [rng.randint(70, 190) for _ in range(3)]
    for y in range(h):
        for x in range(w):
            px[x, y] = tuple(min(255, max(0, b + rng.randint(-20, 20))) for b in base)
    x, y = rng.choice(SPOTS)
    color = rng.choice(list(COLORS))
    ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=COLORS[color])
    return img, {"bbox": [x, y, x + side, y + side], "color": color}


def grounding(out: str, n_train: int, n_eval: int, rng: random.Random, system: str):
    """Pictures + an SFT file that teaches the tool format with a Crop at a random spot (right one time in four:
    the answer is the crop's colour, or "unknown"), and GRPO prompts / held-out prompts with the gold box: GRPO has
    to learn where to look, and it shows in the eval crop IoU and accuracy."""
    q = "What color is the square? Crop it first, then answer with one word."
    sft, prompts = [], []
    for i in range(n_train + n_eval):
        img, target = grounding_image(rng)
        name = f"ground/g_{i:03d}.png"
        os.makedirs(os.path.join(out, "ground"), exist_ok=True)
        img.save(os.path.join(out, name))
        turns = [{"from": "system", "value": system}, {"from": "human", "value": f"<image>\n{q}"}]
        prompts.append({"id": f"ground_{i:03d}", "image": name, "answer": target["color"], "bbox": target["bbox"],
                        "conversations": turns})
        if i < n_train:
            x, y = rng.choice(SPOTS)
            hit = [x, y, x + 32, y + 32] == target["bbox"]
            seen = target["color"] if hit else "unknown"
            said = f"a {seen} square" if hit else "no square"
            sft.append({"id": f"ground_sft_{i:03d}", "image": name, "conversations": turns + [
                {"from": "gpt", "value": f"<think>\nI will zoom in. <tool_call>Crop [{x}, {y}, {x + 32}, {y + 32}]"
                                         f"</tool_call><image>\nThe crop shows {said}.\n</think>\n\n<answer>{seen}"
                                         "</answer>"}]})
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
