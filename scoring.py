"""Scoring a tool trajectory: `fn(rollout, sample) -> float`, one definition for GRPO's rewards and `infer.py --score`
(and the benchmarks' tool statistics). `sample` holds the gold `answer` (a string, number or list of them) and
optionally the gold `bbox` (in rollout.bbox_format); `gold_problem` says when it holds neither usably. A rollout is a
tools.Rollout: its text, answer, tool-call log ({name, args, ok, result}) and the first image's size."""

import math
import re
from collections import Counter
from collections.abc import Callable

import common
from tools import Rollout, bbox_args, iou, parse_tool_call, to_pixels


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
            raise common.ConfigError(f"{key}: unknown scorer {name!r}; built-in: {', '.join(SCORERS)}, or a dotted "
                                     "path")
        fn = common.import_object(name, key) if "." in name else SCORERS[name]
        out.append((name, float(w) if w else 1.0, fn))
    if not out:
        raise common.ConfigError(f"{key} is empty")
    return out


def trajectory_stats(r: Rollout, sample: dict) -> Counter:
    """Counts of one trajectory that add up over a set (and over ranks); `summarize` turns their sums into rates."""
    crops = [t for t in r.tool_calls if t["name"].lower() == "crop"]
    n_iou = len(crops) if sample.get("bbox") is not None and r.image_size is not None else 0
    out = Counter(questions=1, accuracy=score_accuracy(r, sample), format=score_format(r, sample),
                  tool_calls=len(r.tool_calls), with_calls=int(bool(r.tool_calls)), answered=int(bool(r.answer)),
                  crops=len(crops), crops_ok=sum(t["ok"] for t in crops), iou_sum=score_iou(r, sample) * n_iou,
                  iou_n=n_iou, gen_tokens=r.n_generated)
    out.update([f"finish.{r.finish}"] + [f"tool.{t['name']}" for t in r.tool_calls])
    return out


def summarize(totals: Counter) -> dict:
    """Summed trajectory_stats -> the rates and means below (None: nothing to measure), finishes, calls per tool.
    tool_rate: the share of trajectories with at least one tool call; answer_rate: the share that gave an answer."""
    n = max(totals["questions"], 1)
    return {"questions": totals["questions"], "accuracy": totals["accuracy"] / n, "format_rate": totals["format"] / n,
            "tool_calls_per_question": totals["tool_calls"] / n, "tool_rate": totals["with_calls"] / n,
            "answer_rate": totals["answered"] / n,
            "valid_crop_rate": totals["crops_ok"] / totals["crops"] if totals["crops"] else None,
            "mean_crop_iou": totals["iou_sum"] / totals["iou_n"] if totals["iou_n"] else None,
            "mean_generated_tokens": totals["gen_tokens"] / n,
            "finish": {k[7:]: v for k, v in sorted(totals.items()) if k.startswith("finish.")},
            "tools": {k[5:]: v for k, v in sorted(totals.items()) if k.startswith("tool.")}}


def group_metrics(groups: list, prefix: str = "") -> dict:
    """GRPO's scored groups ({sample, rolls, reward (G,), parts {name: (G,)}}) of every rank -> means of the reward
    and each of its components, accuracy, format rate, tool rate, tool calls per rollout, valid-crop rate, mean crop
    IoU, answer rate, response length (summarize's; None: nothing to measure). A collective: every rank calls it."""
    import torch.distributed as dist

    local = Counter()
    for g in groups:
        for r in g["rolls"]:
            local.update(trajectory_stats(r, g["sample"]))
        local.update({"reward": float(g["reward"].sum())})
        local.update({f"reward_{k}": float(v.sum()) for k, v in g["parts"].items()})
    everyone, tot = [None] * dist.get_world_size(), Counter()
    dist.all_gather_object(everyone, dict(local))  # summed over ranks, then divided: the means of the global batch
    for x in everyone:
        tot.update(x)
    names = {"tool_calls_per_question": "tool_calls_per_rollout", "mean_generated_tokens": "response_len"}
    rewards = {f"{prefix}{k}": tot[k] / max(tot["questions"], 1) for k in sorted(tot) if k.startswith("reward")}
    rates = {prefix + names.get(k, k): v for k, v in summarize(tot).items() if isinstance(v, float | None)}
    return {**rewards, **rates}


def gold_problem(sample: dict, bbox_format: str = "pixel") -> tuple[str, str] | None:
    """(field, why) when a sample's gold `answer` / `bbox` cannot be scored, else None. A gold answer is a string, a
    number or a list of them; a box is [x1, y1, x2, y2] with x1 < x2, y1 < y2 inside the bbox_format's range."""
    a = sample.get("answer", "")
    scalar = lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (scalar(a) or (isinstance(a, list) and a and all(map(scalar, a)))):
        return "answer", f"{a!r} is not a string, a number or a list of them"
    b, top = sample.get("bbox", [0, 0, 1, 1]), {"norm": 1, "norm1000": 1000}.get(bbox_format, math.inf)
    if not (isinstance(b, list) and len(b) == 4 and all(scalar(v) and not isinstance(v, str) for v in b) and
            0 <= b[0] < b[2] <= top and 0 <= b[1] < b[3] <= top):
        return "bbox", f"{b!r} is not [x1, y1, x2, y2], x1 < x2, y1 < y2, within the {bbox_format} range"
    return None
