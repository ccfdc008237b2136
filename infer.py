"""Ask a (fine-tuned) Ovis2.5 questions about images; its Crop / Identify calls run automatically (tools.run_tool_loop).

Launch:
    python infer.py --model DIR --image a.jpg --prompt "What is written on the sign?" --think --tools
    python infer.py --model DIR --input q.jsonl --output a.jsonl --image-dir data/demo --tools --batch-size 8
    python infer.py --adapter out/demo_lora/final --image a.jpg --prompt "..." --greedy    # base read from the adapter
Batch input: JSONL lines `{"id", "image": path | [paths], "prompt"}`, `{"id", "messages": [...]}` or data samples
(`{"id", "image", "conversations"}`: the turns before the first gpt turn); paths relative to --image-dir. Output:
JSONL `{"id", "answer", "thinking", "text", "tool_calls", "n_generated", "finish"}`, appended batch by batch; ids
already in --output are skipped, so an interrupted run resumes. A request that cannot be answered (missing image, bad
messages) gets `{"id", "error"}` naming its field, the rest go on, the exit code is 1; --retry-errors asks again.
Sampling defaults: the checkpoint's generation_config.json; --greedy, --temperature etc. override.

Python:
    import infer
    s = infer.load("AIDC-AI/Ovis2.5-2B", adapter=None, dtype=torch.bfloat16, device="cuda")
    r = infer.chat(s, image="a.jpg", prompt="...", enable_thinking=True, use_tools=True)   # a tools.Rollout
    print(r.thinking, r.answer, r.tool_calls)
"""

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import common
import data
import model as ovis
import tools


@dataclass
class Session:
    """A loaded model, ready to answer."""
    model: ovis.Ovis25
    tokenizer: object
    sampling: dict = field(default_factory=dict)  # generate() keywords from generation_config.json


def load(model_path: str | None, adapter: str | None = None, dtype=None, device=None,
         attn_implementation: str = "") -> Session:
    """Checkpoint dir (official layout + tokenizer files) or Hub id ("AIDC-AI/Ovis2.5-2B") -> Session. `adapter`: a
    LoRA dir from lora.py, merged into the weights (model_path None = the base recorded in it). Defaults: cuda +
    bf16, else fp32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model_path = common.resolve_checkpoint(model_path or ovis.adapter_base(adapter))  # a dir or a Hub id
    m = ovis.Ovis25.from_pretrained(model_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    m.eval()
    if adapter:
        m = ovis.load_adapter(m, adapter).merge_and_unload()
    gen, path = {}, os.path.join(model_path, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            g = json.load(f)
        gen = {k: g[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty") if k in g}
        eos = g.get("eos_token_id")
        if eos is not None:
            gen["eos_token_ids"] = tuple(eos if isinstance(eos, list) else [eos])
    return Session(m, ovis.load_tokenizer(model_path), gen)


def _request(req: dict, image_dir: str = ".") -> tuple[list, list, list]:
    """A request ({"messages"} | {"image", "prompt"} | a data sample) -> (chat messages, its images, their keys).
    Keys (what an Identify map is indexed by) are the paths as written in the request, relative to image_dir. A bad
    request raises data.SampleError naming the file, line, id and field."""
    def bad(field, why):
        return data.SampleError(req.get("_file", "request"), req.get("_index", 0), req.get("id"), field, why)

    imgs = req.get("image") or []
    imgs = [("image", i) for i in (imgs if isinstance(imgs, list) else [imgs])]
    if "messages" in req:
        msgs, image_dir = req["messages"], "."  # paths as written in the messages
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
            raise bad("messages", "must be a list of {role, content} messages")
        imgs = [(f"messages[{i}].content[{j}].image", it.get("image")) for i, m in enumerate(msgs)
                if not isinstance(m["content"], str) for j, it in enumerate(m["content"]) if it.get("type") == "image"]
    elif "conversations" not in req and not isinstance(req.get("prompt"), str):
        raise bad("prompt", "a request needs a text prompt (or messages, or conversations)")
    opened = []
    for fld, i in imgs:
        try:
            opened.append(i if isinstance(i, Image.Image) else _rgb(Path(image_dir) / i))
        except (OSError, TypeError) as e:
            raise bad(fld, f"{'missing' if isinstance(e, FileNotFoundError) else 'unreadable'} image "
                           f"{Path(image_dir) / str(i)} ({type(e).__name__})") from e
    if "conversations" in req:
        msgs = data.prompt_messages(req, image_dir)
    elif "messages" not in req:
        msgs = [{"role": "user", "content": [{"type": "image", "image": i} for i in opened] +
                 [{"type": "text", "text": req["prompt"]}]}]
    return msgs, opened, [i if isinstance(i, str) else "" for _, i in imgs]


def _rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def chat_batch(session: Session, requests: list, image_dir: str = ".", *, enable_thinking: bool = False,
               thinking_budget: int | None = None, use_tools: "bool | str | tools.Registry" = False,
               max_tool_calls: int = 5, identify=None, bbox_format: str = "pixel", max_new_tokens: int = 2048,
               min_pixels: int = data.Budgets.single_image_min_pixels,
               max_pixels: int = data.Budgets.single_image_max_pixels, crop_min_pixels: int | None = None,
               crop_max_pixels: int | None = None, **sampling) -> list:
    """Requests (see _request) -> one tools.Rollout each, generated as one left-padded batch. use_tools: True = Crop +
    Identify (`identify`: its map file / dict / callable), a tools spec ("Crop|mypkg.ocr:OCR") or a Registry; its
    system prompt is added when a request has none. thinking_budget applies with enable_thinking only; `sampling`
    overrides session.sampling (generate keywords)."""
    registry = use_tools if isinstance(use_tools, tools.Registry) else tools.load_tools(
        "Crop|Identify" if use_tools is True else use_tools, bbox_format, identify) if use_tools else None
    prompts, images, keys = [], [], []
    for req in requests:
        msgs, imgs, k = _request(req, image_dir)
        if registry and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": registry.system_prompt()}] + msgs
        try:
            prompts.append(ovis.build_inputs(msgs, session.tokenizer, enable_thinking, True, min_pixels, max_pixels))
        except ValueError as e:  # an invalid message, or an image too small / thin for the pixel budget
            raise data.SampleError(req.get("_file", "request"), req.get("_index", 0), req.get("id"),
                                   "messages" if "messages" in req else "image", str(e)) from e
        images.append(imgs)
        keys.append(k)
    return tools.run_tool_loop(
        session.model, session.tokenizer, prompts, images, keys, registry, max_tool_calls, max_new_tokens,
        thinking_budget if enable_thinking else None, crop_min_pixels=crop_min_pixels,
        crop_max_pixels=crop_max_pixels, **{**session.sampling, **sampling})


def chat(session: Session, messages: list | None = None, image=None, prompt: str | None = None, **kw):
    """One conversation: `messages` (chat format, image items hold a path or a PIL image) or `image`(s) + `prompt`.
    Keywords as chat_batch (enable_thinking, thinking_budget, use_tools, max_tool_calls, do_sample, ...)."""
    return chat_batch(session, [{"messages": messages} if messages else {"image": image, "prompt": prompt}], **kw)[0]


def record(req: dict, r, scorers=()) -> dict:
    """One output line. With scorers (tools.parse_scorers): each one's score against the request's answer / bbox,
    and the trajectory's counts (tools.trajectory_stats) that the summary adds up."""
    rec = {"id": req["id"], "answer": r.answer, "thinking": r.thinking, "text": r.text, "tool_calls": r.tool_calls,
           "n_generated": r.n_generated, "finish": r.finish}
    if scorers:
        rec.update(scores={n: float(fn(r, req)) for n, _, fn in scorers}, stats=dict(tools.trajectory_stats(r, req)))
    return rec


def answer(session: Session, requests: list, image_dir: str = ".", **kw) -> list:
    """Requests -> a tools.Rollout each, or an error message (str) for a request that cannot be prepared (it names
    the field) or fails to generate. One bad request never blocks the others: a failing batch is answered again one
    request at a time."""
    try:
        return chat_batch(session, requests, image_dir, **kw)
    except (ValueError, OSError, RuntimeError) as e:  # SampleError is a ValueError; RuntimeError: e.g. out of memory
        if len(requests) > 1:
            return [x for q in requests for x in answer(session, [q], image_dir, **kw)]
        return [str(e) if isinstance(e, data.SampleError) else f"{type(e).__name__}: {e}"]


def summary(path: str, scorers) -> dict:
    """Accuracy, format rate, tool calls per question, valid-crop rate, mean crop IoU, mean generated tokens, finish
    reasons, calls per tool and each scorer's mean over every scored record of `path` (earlier runs included)."""
    recs = [r for r in map(json.loads, Path(path).read_text(encoding="utf-8").splitlines()) if "stats" in r]
    out = tools.summarize(sum((Counter(r["stats"]) for r in recs), Counter()))
    out["scores"] = {n: sum(r["scores"][n] for r in recs) / max(len(recs), 1) for n, _, _ in scorers}
    return out


def done_ids(path: str, retry_errors: bool = False) -> dict:
    """{id: whether its record is an error} of the records already in `path`. A torn last line (an interrupted
    write) is removed; with retry_errors the error records are removed too, so that they are asked again."""
    if not os.path.exists(path):
        return {}
    lines = [x for x in Path(path).read_text(encoding="utf-8").splitlines(keepends=True) if x.strip()]
    keep = [x for x in lines if x.endswith("\n") and not (retry_errors and "error" in json.loads(x))]
    if keep != lines:  # rewritten whole, then renamed: a crash never loses answers
        Path(path + ".tmp").write_text("".join(keep), encoding="utf-8")
        os.replace(path + ".tmp", path)
    return {r["id"]: "error" in r for r in map(json.loads, keep)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir or Hub id (default with --adapter: the base recorded in it)")
    ap.add_argument("--adapter", help="LoRA dir from lora.py, merged at load")
    ap.add_argument("--image", nargs="*", default=[])
    ap.add_argument("--prompt")
    ap.add_argument("--input")
    ap.add_argument("--output")
    ap.add_argument("--retry-errors", action="store_true", help="ask again the requests --output holds errors for")
    ap.add_argument("--score", nargs="?", const="accuracy|format|iou|tool", help="score each answer against the "
                    "request's answer (and bbox) with tools.py scorers (dotted paths for yours); writes a summary")
    ap.add_argument("--image-dir", default=".")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--think", action="store_true", help="enable thinking")
    ap.add_argument("--thinking-budget", type=int)
    ap.add_argument("--tools", nargs="?", const="Crop|Identify", help="run tool calls: Crop|Identify (no value), or "
                    "names / module:Class, e.g. \"Crop|mypkg.ocr:OCR\"")
    ap.add_argument("--identify", help="Identify map: JSON {image_key: [{bbox, name}]}")
    ap.add_argument("--bbox-format", default="pixel", choices=tools.BBOX_FORMATS)
    ap.add_argument("--max-tool-calls", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--greedy", action="store_true")
    for k in ("temperature", "top_p", "repetition_penalty"):
        ap.add_argument("--" + k.replace("_", "-"), type=float)
    ap.add_argument("--top-k", type=int)
    for k in ("min_pixels", "max_pixels", "crop_min_pixels", "crop_max_pixels"):  # image budgets (crops: data.py's)
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--attn-implementation", default="", choices=ovis.ATTN_CHOICES, help="see README (Attention)")
    a = ap.parse_args(argv)
    if not (a.model or a.adapter):
        ap.error("give --model, --adapter or both")
    if bool(a.input) == bool(a.prompt) or bool(a.input) != bool(a.output):
        ap.error("give --prompt (one question) or --input and --output (a batch)")
    session = load(a.model, a.adapter, getattr(torch, a.dtype) if a.dtype else None, a.device, a.attn_implementation)
    torch.manual_seed(a.seed)
    kw = dict(enable_thinking=a.think, thinking_budget=a.thinking_budget, use_tools=a.tools or False,
              identify=a.identify, bbox_format=a.bbox_format, max_tool_calls=a.max_tool_calls,
              max_new_tokens=a.max_new_tokens)
    kw.update({k: getattr(a, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty", "min_pixels",
                                          "max_pixels", "crop_min_pixels", "crop_max_pixels")
               if getattr(a, k) is not None}, **({"do_sample": False} if a.greedy else {}))
    if a.prompt:
        r = chat_batch(session, [{"image": a.image, "prompt": a.prompt}], a.image_dir, **kw)[0]
        for c in r.tool_calls:
            print(f"[tool] {c['name']} {c['args']} -> {'ok' if c['ok'] else 'error'}: {c['result'] or '<image>'}")
        print(f"[thinking]\n{r.thinking}\n" if r.thinking else "", f"[answer]\n{r.answer}", sep="")
        return 0
    return run_batch(session, a, kw)


def run_batch(session: Session, a, kw: dict) -> int:
    """The --input / --output CLI: resumable, error records, optional scores and summary. Returns the exit code."""
    from tqdm import tqdm

    scorers, bad_lines = tools.parse_scorers(a.score, "--score") if a.score else (), []
    reqs = [{**r, "id": r.get("id", r["_index"])} for r in data.load_samples(a.input, bad_lines)]  # id: line
    seen = done_ids(a.output, a.retry_errors)
    todo, n_failed = [r for r in reqs if r["id"] not in seen], 0
    bad = [{"id": f"{a.input}:{e.index}", "error": str(e)} for e in bad_lines if f"{a.input}:{e.index}" not in seen]
    with open(a.output, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="infer", unit="q") as bar:
        f.writelines(json.dumps(rec) + "\n" for rec in bad)  # a line that is no JSON object (id: file:line)
        for s in range(0, len(todo), a.batch_size):
            batch = todo[s:s + a.batch_size]
            for req, r in zip(batch, answer(session, batch, a.image_dir, **kw)):
                n_failed += isinstance(r, str)
                rec = {"id": req["id"], "error": r} if isinstance(r, str) else record(req, r, scorers)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    n_err, n_old = n_failed + len(bad), sum(seen.values())
    print(f"{len(todo) - n_failed} answered, {n_err} errors, {len(reqs) - len(todo)} already in {a.output}"
          + (f" ({n_old} of them errors)" if n_old else "")
          + (" | each error record names its field; --retry-errors asks them again" if n_err + n_old else ""))
    if scorers:
        out = {**summary(a.output, scorers), "errors": n_err + n_old}
        Path(os.path.splitext(a.output)[0] + ".summary.json").write_text(json.dumps(out, indent=2) + "\n")
        print("summary:", json.dumps(out))
    return 1 if n_err + n_old else 0  # finished, but not every request has an answer


if __name__ == "__main__":
    raise SystemExit(main())
