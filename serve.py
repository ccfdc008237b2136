"""`python infer.py --model DIR --serve`: an OpenAI-compatible chat endpoint that runs the model's tools server-side
(Crop, Identify, yours), exactly as infer.py's tool loop does, so a client sends a question and an image once and gets
the answer, the thinking and the whole tool trajectory back. Imported by infer.py only when --serve asks for it.

    POST /v1/chat/completions   OpenAI's chat format (image_url: a data: URL or a path under --image-root, nothing is
                                fetched) + enable_thinking, thinking_budget, use_tools, max_tool_calls, return_crops
    GET  /v1/models, GET /health {"status": "ok", "in_flight", "largest_batch", ...} (503 once the decoder has died)

A reply: content is the answer (the `<answer>` text when there is one), reasoning_content the thinking, the tool
trajectory in message.tool_trajectory. Streamed (SSE): deltas of the text no later token can change (they add up to the
non-streamed reply), each tool call as it runs, usage in the last chunk, then `data: [DONE]`.

Concurrency: one decoding thread. Requests that arrive within batch_wait_ms of each other (up to --batch-size) and
ask for the same settings are decoded together in one batch (on vLLM too: one batch at a time); one that arrives while
a batch runs waits for that batch to end (its slowest row) and goes in the next. A client that disconnects stops its
rows at the next token. Errors are OpenAI error objects (400 / 401 / 404 / 405 / 413 / 422 / 429 / 500 / 503); a bad
request never takes the server down nor keeps its place in --max-concurrency.
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

import infer
import model as ovis
import tools

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}  # others (400, 405, 422): invalid_request_error
FINISH = {"eos": "stop", "length": "length", "cancelled": "stop"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


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
    max_tool_calls: int = 8  # tool calls a request may allow (the server's --max-tool-calls)


@dataclass
class Job:
    """One chat request on its way: its conversation, its settings (requests alike share a batch), its replies."""
    messages: list  # infer._request's {"messages"} form: image items hold PIL images or local paths
    settings: dict  # chat_batch keywords: thinking, budget, tools, calls, max tokens, sampling, group (= n)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # ("token", choice, id) | ("tool", choice, call, crop) | ("done", rollouts) | ("error", e)
    stream: bool = False  # its client reads tokens and tool calls as they come (else only the end)
    cancelled: bool = False  # the client left
    streamed: bool = False  # its client has had tokens: a failed batch cannot decode it again

    def push(self, *item):  # from the decoding thread
        if item[0] in ("token", "tool"):
            if not self.stream:
                return
            self.streamed = True
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Decoder(threading.Thread):
    """The one thread that decodes: takes a job, waits batch_wait_ms for more, decodes those with equal settings
    together (the others next), hands each its rollouts. A batch that fails is run again job by job, so only the
    job at fault gets the error."""

    def __init__(self, session: infer.Session, limits: Limits):
        super().__init__(daemon=True, name="decoder")
        self.session, self.limits, self.jobs = session, limits, queue.Queue()
        self.largest = self.busy = 0  # the most requests decoded together so far; those decoding now (GET /health)
        self.stopped = 0  # requests whose client left before they were done, and that stopped then

    def run(self):
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
            while len(batch) < self.limits.batch_size:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            alike = lambda j: (json.dumps(j.settings, sort_keys=True, default=str), "seed" in j.settings and id(j))
            while batch:  # (a seeded request alone: on vLLM a row's seed depends on its place in the batch)
                same = [j for j in batch if alike(j) == alike(batch[0])]
                batch = [j for j in batch if j not in same]
                self.stopped += sum(j.cancelled for j in same)
                self.decode([j for j in same if not j.cancelled])

    def decode(self, jobs: list[Job]):
        if not jobs:
            return
        s, n = jobs[0].settings, jobs[0].settings["group"]
        self.largest, self.busy = max(self.largest, len(jobs)), len(jobs)
        events = SimpleNamespace(token=lambda i, t: jobs[i // n].push("token", i % n, t),  # row i: job i // n
                                 tool=lambda i, call, crop: jobs[i // n].push("tool", i % n, call, crop),
                                 cancelled=lambda i: jobs[i // n].cancelled)
        try:
            rolls = infer.chat_batch(self.session, [{"messages": j.messages} for j in jobs], events=events, **s)
        except Exception as e:  # noqa: BLE001 (reported to the job at fault, never the end of the thread)
            status = 503 if isinstance(e, (MemoryError, RuntimeError)) else 400
            for j in jobs:  # each alone again, to find the job at fault, unless alone already or its client has tokens
                if j.streamed or len(jobs) == 1:
                    j.push("error", ApiError(status, f"{type(e).__name__}: {e}"))
                else:
                    self.decode([j])
            return
        finally:
            self.busy = 0
        for k, j in enumerate(jobs):
            self.stopped += any(r.finish == "cancelled" for r in rolls[k * n:(k + 1) * n])
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
        return decoded(io.BytesIO(raw), limits, where, convert=True)
    if root is None:
        raise ApiError(400, f"{where}: local image paths need the server's --image-root", where)
    try:  # a NUL byte, a name too long: the OS refuses, the client hears why
        path = (root / url.removeprefix("file://")).resolve()
        inside, found = path.is_relative_to(root), path.is_file()
        size = path.stat().st_size if inside and found else 0
    except (OSError, ValueError) as e:
        raise ApiError(400, f"{where}: not a usable path ({e})", where, "bad_path") from None
    if not inside:
        raise ApiError(400, f"{where}: {url!r} is outside the server's --image-root", where, "path_outside_root")
    if not found:
        raise ApiError(400, f"{where}: no image {url!r} under --image-root", where)
    if size > limits.max_image_bytes:
        raise ApiError(413, f"{where}: image over {limits.max_image_bytes} bytes", where, "image_too_large")
    decoded(path, limits, where, convert=False)  # its size from the header: the decoder thread decodes it
    return str(path)


def decoded(source, limits: Limits, where: str, convert: bool):
    """An image file -> its pixels checked, then RGB (convert) or None; what PIL raises on a broken file: a 400."""
    try:
        with Image.open(source) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise ApiError(413, f"{where}: {image.width}x{image.height} is over {limits.max_image_pixels} "
                                    "pixels", where, "image_too_large")
            return image.convert("RGB") if convert else None  # decodes: a truncated file fails here
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, f"{where}: the image is too large to decode", where, "image_too_large") from None
    except Exception as e:  # noqa: BLE001 (PIL's errors on crafted files are of many types)
        raise ApiError(400, f"{where}: not a readable image ({type(e).__name__}: {e})", where, "bad_image") from None


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
        v = body.get(key)
        v = default if v is None else v  # an explicit null: the default
        if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
            raise ApiError(422, f"{key}: {v!r} has the wrong type", key)
        return v

    n, calls = get("n", (int,), 1), get("max_tool_calls", (int,))
    asked_max = [get(k, (int,)) for k in ("max_completion_tokens", "max_tokens")]  # (0 is asked for, and refused)
    max_tokens = next((v for v in asked_max if v is not None), limits.max_tokens)
    temperature, top_p = (get(k, (int, float)) for k in ("temperature", "top_p"))
    budget, seed = (get(k, (int,)) for k in ("thinking_budget", "seed"))
    ranges = (("n", n, 1, limits.max_n),
              ("max_tokens" if asked_max[0] is None else "max_completion_tokens", max_tokens, 1, limits.max_tokens),
              ("max_tool_calls", calls, 0, limits.max_tool_calls), ("temperature", temperature, 0, 2),
              ("top_p", top_p, 1e-6, 1), ("thinking_budget", budget, 0, max_tokens),
              ("seed", seed, 0, 2**63 - 1))  # (torch's and vLLM's seeds are 64-bit)
    for key, v, lo, hi in ranges:
        if v is not None and not lo <= v <= hi:
            raise ApiError(400, f"{key}: {v} is not in {lo}..{hi}", key)
    get("stream", (bool,)), get("return_crops", (bool,))  # (type-checked here, read by chat)
    sampling = {} if temperature is None else {"do_sample": False} if temperature == 0 else \
        {"do_sample": True, "temperature": float(temperature)}
    asked = {"enable_thinking": get("enable_thinking", (bool,)), "thinking_budget": budget, "max_tool_calls": calls,
             "max_new_tokens": max_tokens, "group": n, **sampling, "top_p": top_p and float(top_p), "seed": seed,
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
            s = dict(s)
            s["generator"] = torch.Generator().manual_seed(s.pop("seed"))  # (seed itself would reach generate)
        return s


def trajectory(r, return_crops: bool) -> list:
    """The tool calls of a rollout as the reply's extension field."""
    crops = iter(r.crops)
    return [tool_entry(c, next(crops) if c["ok"] and c["result"] is None else None, return_crops)  # (None: a text)
            for c in r.tool_calls]


def tool_entry(call: dict, crop, return_crops: bool) -> dict:
    """One tool call: name, arguments, ok, result, and its crop (a data: URL when asked for, else its size)."""
    entry = {"name": call["name"], "arguments": call["args"], "ok": call["ok"], "result": call["result"]}
    if crop is not None:
        entry["crop"] = data_url(crop) if return_crops else f"{crop.width}x{crop.height}"
    return entry


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def usage(rolls: list) -> dict:
    """prompt / completion tokens (and the visual ones among them: the prompt's images, the crops) of n rollouts."""
    p, done = rolls[0].prompt_len, sum(r.n_generated for r in rolls)
    prompt_visual = sum(t == ovis.VISUAL_ATOM_ID for t in rolls[0].token_ids[:p])
    crop_visual = sum(t == ovis.VISUAL_ATOM_ID for r in rolls for t in r.token_ids[p:])
    return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done,
            "prompt_tokens_details": {"image_tokens": prompt_visual}, "tool_image_tokens": crop_visual}


def completion(rid: str, name: str, rolls: list, return_crops: bool) -> dict:
    choices = [{"index": i, "finish_reason": FINISH[r.finish], "logprobs": None,
                "message": {"role": "assistant", "content": r.answer, "reasoning_content": r.thinking or None,
                            "tool_trajectory": trajectory(r, return_crops)}} for i, r in enumerate(rolls)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name, "choices": choices,
            "usage": usage(rolls)}


class ChoiceStream:
    """One choice's text as its tokens come -> the new reasoning / content: only what no later token can change, so the
    deltas add up to the reply exactly. tools.split_output's answer is the `<answer>` block once there is one, else
    all after `</think>`: it streams inside a block after `</think>`, else comes with the choice's last chunk."""

    def __init__(self, tokenizer, eos: tuple, max_tokens: int):
        self.tokenizer, self.eos, self.left = tokenizer, eos, max_tokens
        self.done, self.round = "", []  # text of the finished rounds (tool results included); this round's ids
        self.said = ["", ""]  # reasoning, content sent so far

    def token(self, t: int) -> dict:
        self.left -= 1  # a batch decodes to its longest budget; the loop cuts a row's tokens past its own
        if self.left < 0:
            return {}
        if t not in self.eos:
            self.round.append(t)
        return self.deltas(self.done + self.tokenizer.decode(self.round), final=False)

    def tool(self, call: dict, crop) -> None:  # the round ends with the call; its result is text the loop added
        result = "<image>" if crop is not None else self.tokenizer.decode(tools.tool_result_ids(
            tools.ToolResult(call["name"], text=call["result"]), self.tokenizer))  # as the loop appends it
        self.done += self.tokenizer.decode(self.round) + result
        self.round = []

    def deltas(self, text: str, final: bool) -> dict:
        if final:
            now = tools.split_output(text)
        else:
            cut = text.rfind("<")
            text = (text[:cut] if cut > text.rfind(">") else text).rstrip("\ufffd")  # a tag / character being written
            thinking, _ = tools.split_output(text)  # grows, whatever comes (strip() only holds back spaces)
            _, closed, tail = text.partition("</think>")
            block = re.search(r"<answer>(.*?)(?:</answer>|$)", tail, re.DOTALL)
            now = thinking, block.group(1).strip() if closed and block else ""
        out = [now[k][len(self.said[k]):] if now[k].startswith(self.said[k]) else "" for k in (0, 1)]
        self.said = [now[k] if now[k].startswith(self.said[k]) else self.said[k] for k in (0, 1)]
        return {k: v for k, v in zip(("reasoning_content", "content"), out) if v}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream(job: Job, served: Served, rid: str, return_crops: bool):
    """The SSE body: deltas as tokens come, each tool call as it runs, the finish reasons, usage, [DONE]."""
    s, name, eos = served.session, served.name, tuple(served.session.sampling.get("eos_token_ids", ovis.EOS_IDS))
    choices = [ChoiceStream(s.tokenizer, eos, job.settings["max_new_tokens"]) for _ in range(job.settings["group"])]
    calls = [0] * len(choices)

    def chunk(i, delta, finish=None):
        return sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                    "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    for i in range(len(choices)):
        yield chunk(i, {"role": "assistant", "content": ""})
    while True:
        item = await job.out.get()
        if item[0] == "token":
            delta = choices[item[1]].token(item[2])
            if delta:
                yield chunk(item[1], delta)
        elif item[0] == "tool":
            i, call, crop = item[1:]
            choices[i].tool(call, crop)
            entry = await asyncio.to_thread(tool_entry, call, crop, return_crops)  # (PNG encoding off the event loop)
            calls[i] += 1
            yield chunk(i, {"tool_trajectory": [{"index": calls[i] - 1, **entry}]})
        elif item[0] == "error":
            yield sse(item[1].body())
            break
        else:  # done: what the final text adds (the held-back end), the finish reasons, usage
            rolls = item[1]
            for i, r in enumerate(rolls):
                yield chunk(i, choices[i].deltas(r.text, final=True), FINISH[r.finish])
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                       "choices": [], "usage": await asyncio.to_thread(usage, rolls)})
            break
    yield "data: [DONE]\n\n"


class Slot:
    """A request's place under --max-concurrency, given back once however the request ends; its job then stops."""

    def __init__(self, served: Served):
        self.served, self.job, self.held = served, None, True
        served.in_flight[0] += 1

    def release(self):
        if self.job is not None:
            self.job.cancelled = True
        self.served.in_flight[0] -= self.held
        self.held = False


def app(served: Served):
    """The FastAPI application over a started Decoder."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    api = FastAPI(title="ovis-tune", docs_url=None, redoc_url=None)
    decoder = Decoder(served.session, served.limits)
    decoder.start()

    def refuse(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    class Streamed(StreamingResponse):  # gives the slot back however it ends: done, the client gone mid-stream, or
        slot: Slot  # gone before the body started (Starlette then cancels the body unstarted: no generator cleanup)
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.slot.release()

    @api.exception_handler(ApiError)
    @api.exception_handler(ClientDisconnect)  # (gone before its body was read: no bug, and nobody to answer)
    async def api_error(request: Request, e: Exception):
        return refuse(e if isinstance(e, ApiError) else ApiError(400, "the client left before sending its body"))

    @api.exception_handler(HTTPException)  # an unknown route (404), a wrong method (405): OpenAI's error object too
    async def http_error(request: Request, e: HTTPException):
        return refuse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @api.exception_handler(Exception)  # (Starlette then re-raises it: uvicorn logs the traceback)
    async def bug(request: Request, e: Exception):
        return refuse(ApiError(500, f"internal error ({type(e).__name__}: {e})"))

    def check_key(request) -> None:
        given = request.headers.get("authorization") or ""
        if served.api_key and not hmac.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")

    @api.get("/health")
    async def health():
        alive = decoder.is_alive()
        return JSONResponse({"status": "ok" if alive else "decoder stopped", "model": served.name,
                             "engine": "vllm" if served.session.vllm is not None else "model",
                             "in_flight": served.in_flight[0], "queued": decoder.jobs.qsize(),
                             "decoding": decoder.busy, "largest_batch": decoder.largest, "stopped": decoder.stopped},
                            status_code=200 if alive else 503)

    @api.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "ovis-tune"}]}

    async def body_of(request: Request, limit: int) -> dict:
        too_big = ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        raw = bytearray()
        async for part in request.stream():  # a chunked body has no length to check first
            raw += part
            if len(raw) > limit:
                raise too_big
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        slot = None
        try:
            check_key(request)
            body = await body_of(request, served.limits.max_body_bytes)
            if body.get("model") not in (None, served.name):
                raise ApiError(404, f"model {body.get('model')!r} is not served here (GET /v1/models: "
                                    f"{served.name!r})", "model", "model_not_found")
            if not decoder.is_alive():
                raise ApiError(503, "the decoding thread has stopped; restart the server")
            if served.in_flight[0] >= served.limits.max_concurrency:
                raise ApiError(429, f"{served.in_flight[0]} requests in flight (--max-concurrency); retry later")
            slot = Slot(served)  # taken before any await: the limit holds
            settings = settings_of(body, served.limits, served)
            msgs = await asyncio.to_thread(messages_of, body, served.image_root, served.limits)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            crops, streaming = body.get("return_crops") is True, body.get("stream") is True
            slot.job = job = Job(msgs, settings, asyncio.get_running_loop(), asyncio.Queue(), streaming)
            decoder.jobs.put(job)
            if streaming:
                response = Streamed(stream(job, served, rid, crops), media_type="text/event-stream")
                response.slot, slot = slot, None  # the response gives it back
                return response
            while True:  # a client that leaves stops its rows
                try:
                    item = await asyncio.wait_for(job.out.get(), timeout=0.25)
                except asyncio.TimeoutError:  # (TimeoutError itself only from Python 3.11)
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if item[0] == "error":
                    return refuse(item[1])
                if item[0] == "done":  # (crops PNG-encoded off the event loop)
                    return await asyncio.to_thread(completion, rid, served.name, item[1], crops)
        finally:  # (an ApiError is answered by api_error; any other exception, a bug, by bug: logged, a 500)
            if slot is not None:
                slot.release()

    return api


def served_from(session: infer.Session, a, kw: dict) -> Served:
    """infer.py's parsed flags and chat_batch keywords -> what a server serves."""
    same = ("batch_size", "batch_wait_ms", "max_concurrency", "max_body_bytes", "max_image_bytes", "max_image_pixels",
            "max_n")  # flags named as the limits; --max-tool-calls (else the record's) is the default and the most
    limits = Limits(**{k: getattr(a, k) for k in same}, max_tokens=a.max_new_tokens,
                    max_tool_calls=session.setting("max_tool_calls", a.max_tool_calls))
    name = a.served_model_name or Path((a.model or a.adapter).rstrip("/")).name
    defaults = {k: v for k, v in kw.items() if k not in ("use_tools", "max_new_tokens", "seed") and v is not None}
    return Served(session, name, kw["use_tools"] or None, kw["budgets"], limits, {**defaults, "image_dir": "."},
                  a.api_key or "", Path(a.image_root).resolve() if a.image_root else None)


def main(session: infer.Session, a, kw: dict) -> int:
    """infer.py --serve: uvicorn on --host / --port until Ctrl-C."""
    import uvicorn

    served = served_from(session, a, kw)
    print(f"serving {served.name!r} on http://{a.host}:{a.port}/v1 ({'vLLM' if session.vllm else 'model path'}, "
          f"batches of <= {served.limits.batch_size}{', API key required' if a.api_key else ''})", flush=True)
    uvicorn.run(app(served), host=a.host, port=a.port, log_level="warning")
    return 0
