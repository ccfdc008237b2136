"""`python infer.py --model DIR --serve`: an OpenAI-compatible chat endpoint that runs the model's tools server-side
(Crop, Identify, yours), exactly as infer.py's tool loop does, so a client sends a question and an image once and gets
the answer, the thinking and the whole tool trajectory back. Imported by infer.py only when --serve asks for it.

    POST /v1/chat/completions   the OpenAI chat format: messages with `text` and `image_url` parts (a data: URL, or a
                                path under --image-root; the server fetches nothing), max_tokens (or
                                max_completion_tokens), temperature, top_p, seed, n, stream; extra body fields
                                enable_thinking, thinking_budget, use_tools, max_tool_calls, return_crops
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...} (503 once the decoding thread has died)

A reply is OpenAI's chat.completion: choices[i].message.content is the answer (the `<answer>` text when there is
one), reasoning_content the thinking, finish_reason "stop" | "length", usage with the visual tokens, and the tool
trajectory in the extension field message.tool_trajectory (each call: name, arguments, ok, result, and the crop as a
data: URL with return_crops). Streamed (SSE): reasoning_content / content deltas as tokens come, each tool call as it
runs (delta.tool_trajectory), usage in the last chunk, then `data: [DONE]`.

Concurrency: one decoding thread. Requests that arrive within batch_wait_ms of each other (up to --batch-size) and
ask for the same settings are decoded together in one batch (on vLLM: handed to its scheduler together); one that
arrives while a batch runs starts with the next batch, so it waits at most the running batch's time. A client that
disconnects stops its rows at the next token. Errors are OpenAI error objects with 400 / 401 / 404 / 413 / 422 / 429
/ 503; a bad request never takes the server down.
"""

import asyncio
import base64
import binascii
import io
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import infer
import model as ovis
import tools

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
FINISH = {"eos": "stop", "length": "length", "cancelled": "stop"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": ERROR_TYPES[self.status], "param": self.param,
                          "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for, and how requests are gathered into batches."""
    batch_size: int = 8  # requests decoded together at most
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_concurrency: int = 64  # requests in flight (queued or decoding); more: 429
    max_body_bytes: int = 32 << 20  # a request body; larger: 413
    max_image_bytes: int = 16 << 20  # one image, encoded; larger: 413
    max_image_pixels: int = 8192 * 8192  # one image, decoded; larger: 413
    max_tokens: int = 8192  # the most a request may generate
    max_n: int = 8  # completions a request may ask for
    max_tool_calls: int = 8  # tool calls a request may allow


@dataclass
class Job:
    """One chat request on its way: its conversation, its settings (requests alike share a batch), its replies."""
    messages: list  # infer._request's {"messages"} form: image items hold PIL images or local paths
    settings: dict  # chat_batch keywords: thinking, budget, tools, calls, max tokens, sampling, group (= n)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # ("token", choice, id) | ("tool", choice, call, crop) | ("done", rollouts) | ("error", e)
    cancelled: bool = False  # the client left

    def push(self, *item):  # from the decoding thread
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class _Events:
    """The tool loop's events of one batch -> each job's queue (row i = job i // n, choice i % n)."""

    def __init__(self, jobs: list[Job], n: int):
        self.jobs, self.n = jobs, n

    def token(self, i: int, t: int):
        self.jobs[i // self.n].push("token", i % self.n, t)

    def tool(self, i: int, call: dict, crop):
        self.jobs[i // self.n].push("tool", i % self.n, call, crop)

    def cancelled(self, i: int) -> bool:
        return self.jobs[i // self.n].cancelled


class Decoder(threading.Thread):
    """The one thread that decodes: takes a job, waits batch_wait_ms for more, decodes those with equal settings
    together (the others next), hands each its rollouts. A batch that fails is run again job by job, so only the
    job at fault gets the error."""

    def __init__(self, session: infer.Session, limits: Limits):
        super().__init__(daemon=True, name="decoder")
        self.session, self.limits, self.jobs = session, limits, queue.Queue()

    def run(self):
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
            while len(batch) < self.limits.batch_size:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            while batch:
                key = json.dumps(batch[0].settings, sort_keys=True, default=str)
                same = [j for j in batch if json.dumps(j.settings, sort_keys=True, default=str) == key]
                batch = [j for j in batch if j not in same]
                self.decode([j for j in same if not j.cancelled])

    def decode(self, jobs: list[Job]):
        if not jobs:
            return
        s, n = jobs[0].settings, jobs[0].settings["group"]
        try:
            rolls = infer.chat_batch(self.session, [{"messages": j.messages} for j in jobs], events=_Events(jobs, n),
                                     **s)
        except Exception as e:  # noqa: BLE001 (reported to the job at fault, never the end of the thread)
            if len(jobs) > 1:
                for j in jobs:
                    self.decode([j])
                return
            status = 503 if isinstance(e, (MemoryError, RuntimeError)) else 400
            return jobs[0].push("error", ApiError(status, f"{type(e).__name__}: {e}"))
        for k, j in enumerate(jobs):
            j.push("done", rolls[k * n:(k + 1) * n])


# ----------------------------------------------------------------------------------------------------------------
# Requests in: the OpenAI chat format -> our messages and chat_batch settings


def read_image(url: str, root: Path | None, limits: Limits, where: str):
    """An image_url: a data: URL -> a PIL image (size limits checked), a path under --image-root -> its path."""
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: the server fetches nothing; send the image as a data: URL or a path under "
                            "its --image-root", where, "remote_image")
    if url.startswith("data:"):
        head, _, b64 = url.partition(",")
        if ";base64" not in head:
            raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", where)
        if len(b64) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, f"{where}: image over {limits.max_image_bytes} bytes", where, "image_too_large")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data: URL is not valid base64", where, "bad_base64") from None
        try:
            image = Image.open(io.BytesIO(raw))
        except OSError:
            raise ApiError(400, f"{where}: not an image", where, "bad_image") from None
        if image.width * image.height > limits.max_image_pixels:
            raise ApiError(413, f"{where}: {image.width}x{image.height} is over {limits.max_image_pixels} pixels",
                           where, "image_too_large")
        return image.convert("RGB")
    if root is None:
        raise ApiError(400, f"{where}: local image paths need the server's --image-root", where)
    path = (root / url.removeprefix("file://")).resolve()
    if not path.is_relative_to(root):
        raise ApiError(400, f"{where}: {url!r} is outside the server's --image-root", where, "path_outside_root")
    if not path.is_file():
        raise ApiError(400, f"{where}: no image {url!r} under --image-root", where)
    if path.stat().st_size > limits.max_image_bytes:
        raise ApiError(413, f"{where}: image over {limits.max_image_bytes} bytes", where, "image_too_large")
    return str(path)


def messages_of(body: dict, root: Path | None, limits: Limits) -> list:
    """OpenAI messages -> ours ({"role", "content": [{"type": "image", "image": ...}, {"type": "text", ...}]})."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}: role must be system, user or assistant (the server runs the tools "
                                "itself)", f"{where}.role")
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m.get("content"), str) else m.get("content")
        if not isinstance(parts, list):
            raise ApiError(400, f"{where}.content: a string or a list of parts", f"{where}.content")
        content = []
        for j, p in enumerate(parts):
            at = f"{where}.content[{j}]"
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                content.append({"type": "text", "text": p["text"]})
            elif isinstance(p, dict) and p.get("type") == "image_url" and m["role"] != "assistant":
                url = p["image_url"].get("url") if isinstance(p.get("image_url"), dict) else p.get("image_url")
                if not isinstance(url, str):
                    raise ApiError(400, f"{at}.image_url: needs a url", f"{at}.image_url")
                content.append({"type": "image", "image": read_image(url, root, limits, at)})
            else:
                raise ApiError(400, f"{at}: a text part, or an image_url part in a system / user message", at)
        out.append({"role": m["role"], "content": content})
    return out


def settings_of(body: dict, limits: Limits, served: "Served") -> dict:
    """The chat_batch keywords of a request, each checked (a wrong type: 422; out of range: 400)."""
    def get(key, types, default=None):
        v = body.get(key, default)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
            raise ApiError(422, f"{key}: {v!r} has the wrong type", key)
        return v

    n = get("n", (int,), 1)
    if not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n: {n} is not in 1..{limits.max_n}", "n")
    max_tokens = get("max_completion_tokens", (int,)) or get("max_tokens", (int,)) or limits.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens: {max_tokens} is not in 1..{limits.max_tokens}", "max_tokens")
    calls = get("max_tool_calls", (int,))
    if calls is not None and not 0 <= calls <= limits.max_tool_calls:
        raise ApiError(400, f"max_tool_calls: {calls} is not in 0..{limits.max_tool_calls}", "max_tool_calls")
    temperature = get("temperature", (int, float))
    sampling = {"do_sample": False} if temperature == 0 else {"temperature": float(temperature)} \
        if temperature is not None else {}
    if get("top_p", (int, float)) is not None:
        sampling["top_p"] = float(body["top_p"])
    seed = get("seed", (int,))
    if seed is not None:
        sampling["seed"] = seed
    asked = {"enable_thinking": get("enable_thinking", (bool,)), "thinking_budget": get("thinking_budget", (int,)),
             "max_tool_calls": calls, "max_new_tokens": max_tokens, "group": n, **sampling,
             "use_tools": served.registry if get("use_tools", (bool,), True) and served.registry else False}
    return served.sampling({**served.defaults, **{k: v for k, v in asked.items() if v is not None}})


# ----------------------------------------------------------------------------------------------------------------
# Replies out: rollouts -> chat.completion; a stream of tokens -> SSE chunks


@dataclass
class Served:
    """What the server was started with: the session, its name, tools, budgets, limits, and who may ask."""
    session: infer.Session
    name: str
    registry: "tools.Registry | None"
    budgets: object
    limits: Limits
    defaults: dict = field(default_factory=dict)  # chat_batch keywords from infer.py's flags (thinking, sampling...)
    api_key: str = ""
    image_root: Path | None = None
    in_flight: list = field(default_factory=lambda: [0])

    def sampling(self, s: dict) -> dict:
        """Sampling keywords for this engine: vLLM takes a seed; the model path a torch.Generator of it."""
        if "seed" in s and self.session.vllm is None:
            import torch

            s = {**s, "generator": torch.Generator().manual_seed(s.pop("seed"))}
        return s


def trajectory(r, return_crops: bool) -> list:
    """The tool calls of a rollout as the reply's extension field (crops as data: URLs when asked for)."""
    crops = iter(r.crops)
    out = []
    for c in r.tool_calls:
        entry = {"name": c["name"], "arguments": c["args"], "ok": c["ok"], "result": c["result"]}
        if c["ok"] and c["result"] is None:  # an image result
            crop = next(crops)
            entry["crop"] = data_url(crop) if return_crops else f"{crop.width}x{crop.height}"
        out.append(entry)
    return out


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def usage(rolls: list) -> dict:
    """prompt / completion tokens (and the visual ones among them: the prompt's images, the crops) of n rollouts."""
    p = rolls[0].prompt_len
    prompt_visual = sum(t == ovis.VISUAL_ATOM_ID for t in rolls[0].token_ids[:p])
    crop_visual = sum(t == ovis.VISUAL_ATOM_ID for r in rolls for t in r.token_ids[p:])
    done = sum(r.n_generated for r in rolls)
    return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done,
            "prompt_tokens_details": {"image_tokens": prompt_visual}, "tool_image_tokens": crop_visual}


def completion(rid: str, name: str, rolls: list, return_crops: bool) -> dict:
    choices = [{"index": i, "finish_reason": FINISH[r.finish], "logprobs": None,
                "message": {"role": "assistant", "content": r.answer, "reasoning_content": r.thinking or None,
                            "tool_trajectory": trajectory(r, return_crops)}} for i, r in enumerate(rolls)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name, "choices": choices,
            "usage": usage(rolls)}


class ChoiceStream:
    """One choice's text as its tokens come -> the new reasoning / content (split as tools.split_output splits the
    finished text; a tag or a character still being written is held back, so the deltas add up to the final
    reply)."""

    def __init__(self, tokenizer, eos: tuple):
        self.tokenizer, self.eos = tokenizer, eos
        self.done, self.round = "", []  # text of the finished rounds (tool results included); this round's ids
        self.said = ["", ""]  # reasoning, content sent so far

    def token(self, t: int) -> tuple[str, str]:
        if t not in self.eos:
            self.round.append(t)
        return self.deltas(self.done + self.tokenizer.decode(self.round), final=False)

    def tool(self, call: dict, crop) -> None:  # the round ends with the call; its result is text the loop added
        result = "<image>" if crop is not None else f"<tool_response>{call['result']}</tool_response>"
        self.done += self.tokenizer.decode(self.round) + result
        self.round = []

    def deltas(self, text: str, final: bool) -> tuple[str, str]:
        if not final:
            cut = text.rfind("<")
            text = text[:cut] if cut > text.rfind(">") else text  # a tag still being written
            text = text.rstrip("\ufffd")  # a character still being written
        now = tools.split_output(text)
        out = []
        for k in (0, 1):
            grown = now[k].startswith(self.said[k])
            out.append(now[k][len(self.said[k]):] if grown else "")
            self.said[k] = now[k] if grown else self.said[k]
        return out[0], out[1]


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream(job: Job, served: Served, rid: str, return_crops: bool):
    """The SSE body: deltas as tokens come, each tool call as it runs, the finish reasons, usage, [DONE]."""
    s, name = served.session, served.name
    eos = tuple(s.sampling.get("eos_token_ids", ovis.EOS_IDS))
    choices = [ChoiceStream(s.tokenizer, eos) for _ in range(job.settings["group"])]
    calls = [0] * len(choices)

    def chunk(i, delta, finish=None):
        return sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                    "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    try:
        for i in range(len(choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        while True:
            item = await job.out.get()
            if item[0] == "token":
                reasoning, content = choices[item[1]].token(item[2])
                if reasoning or content:
                    yield chunk(item[1], {k: v for k, v in (("reasoning_content", reasoning), ("content", content))
                                          if v})
            elif item[0] == "tool":
                i, call, crop = item[1:]
                choices[i].tool(call, crop)
                entry = {"index": calls[i], "name": call["name"], "arguments": call["args"], "ok": call["ok"],
                         "result": call["result"]}
                if crop is not None:
                    entry["crop"] = data_url(crop) if return_crops else f"{crop.width}x{crop.height}"
                calls[i] += 1
                yield chunk(i, {"tool_trajectory": [entry]})
            elif item[0] == "error":
                yield sse(item[1].body())
                break
            else:  # done: what the final text adds (the held-back end), the finish reasons, usage
                rolls = item[1]
                for i, r in enumerate(rolls):
                    reasoning, content = choices[i].deltas(r.text, final=True)
                    delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
                    yield chunk(i, delta, FINISH[r.finish])
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": name, "choices": [], "usage": usage(rolls)})
                break
        yield "data: [DONE]\n\n"
    finally:  # a client that left mid-stream: its rows stop at their next token
        job.cancelled = True
        served.in_flight[0] -= 1


def app(served: Served):
    """The FastAPI application over a started Decoder."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    api = FastAPI(title="ovis-tune", docs_url=None, redoc_url=None)
    decoder = Decoder(served.session, served.limits)
    decoder.start()

    def refuse(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request) -> None:
        if served.api_key and request.headers.get("authorization") != f"Bearer {served.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")

    @api.get("/health")
    async def health():
        alive = decoder.is_alive()
        return JSONResponse({"status": "ok" if alive else "decoder stopped", "model": served.name,
                             "engine": "vllm" if served.session.vllm is not None else "model",
                             "in_flight": served.in_flight[0], "queued": decoder.jobs.qsize()},
                            status_code=200 if alive else 503)

    @api.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return refuse(e)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "ovis-tune"}]}

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            check_key(request)
            if int(request.headers.get("content-length") or 0) > served.limits.max_body_bytes:
                raise ApiError(413, f"request body over {served.limits.max_body_bytes} bytes", code="body_too_large")
            raw = await request.body()
            if len(raw) > served.limits.max_body_bytes:
                raise ApiError(413, f"request body over {served.limits.max_body_bytes} bytes", code="body_too_large")
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object")
            if body.get("model") not in (None, served.name):
                raise ApiError(404, f"model {body.get('model')!r} is not served here (GET /v1/models: "
                                    f"{served.name!r})", "model", "model_not_found")
            if not decoder.is_alive():
                raise ApiError(503, "the decoding thread has stopped; restart the server")
            if served.in_flight[0] >= served.limits.max_concurrency:
                raise ApiError(429, f"{served.in_flight[0]} requests in flight (--max-concurrency); retry later")
            msgs = await asyncio.to_thread(messages_of, body, served.image_root, served.limits)
            settings = settings_of(body, served.limits, served)
        except ApiError as e:
            return refuse(e)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        job = Job(msgs, settings, asyncio.get_running_loop(), asyncio.Queue())
        served.in_flight[0] += 1
        decoder.jobs.put(job)
        crops = bool(body.get("return_crops"))
        if body.get("stream"):
            return StreamingResponse(stream(job, served, rid, crops), media_type="text/event-stream")
        try:
            while True:  # a client that leaves stops its rows
                try:
                    item = await asyncio.wait_for(job.out.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled = True
                        return JSONResponse({}, status_code=499)
                    continue
                if item[0] == "error":
                    return refuse(item[1])
                if item[0] == "done":
                    return completion(rid, served.name, item[1], crops)
        finally:
            served.in_flight[0] -= 1

    return api


def served_from(session: infer.Session, a, kw: dict) -> Served:
    """infer.py's parsed flags and chat_batch keywords -> what a server serves."""
    limits = Limits(batch_size=a.batch_size, max_concurrency=a.max_concurrency, max_tokens=a.max_new_tokens,
                    max_n=a.max_n, max_body_bytes=a.max_body_bytes, max_image_pixels=a.max_image_pixels,
                    batch_wait_ms=a.batch_wait_ms)
    name = a.served_model_name or Path((a.model or a.adapter).rstrip("/")).name
    defaults = {k: v for k, v in kw.items() if k not in ("use_tools", "max_new_tokens", "seed") and v is not None}
    return Served(session, name, kw["use_tools"] or None, kw["budgets"], limits, {**defaults, "image_dir": "."},
                  a.api_key or "", Path(a.image_root).resolve() if a.image_root else None)


def main(session: infer.Session, a, kw: dict) -> int:
    """infer.py --serve: uvicorn on --host / --port until Ctrl-C."""
    import uvicorn

    served = served_from(session, a, kw)
    name, limits = served.name, served.limits
    print(f"serving {name!r} on http://{a.host}:{a.port}/v1 ({'vLLM' if session.vllm else 'model path'}, batches of "
          f"<= {limits.batch_size}{', API key required' if a.api_key else ''})", flush=True)
    uvicorn.run(app(served), host=a.host, port=a.port, log_level="warning")
    return 0
