"""`infer.py --serve` for real: the server started as a user starts it (a subprocess on 127.0.0.1), talked to with the
real `openai` client and raw HTTP: a tool-using chat answers as infer.chat does (each request field too), a stream
reassembles to the same reply, 16 concurrent clients get what they get one by one in shared batches, every bad input
gets its status and OpenAI error object and leaves no slot taken, the limits follow the flags, and a client that drops
(mid-stream, or before the stream starts) stops its generation."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

import infer
import model as M
import serve
import tools
from _util import DEMO, ROOT

openai = pytest.importorskip("openai") if not os.environ.get("CI") else __import__("openai")
httpx = pytest.importorskip("httpx") if not os.environ.get("CI") else __import__("httpx")
KEY = "sk-test-key"
HEAD = {"Authorization": f"Bearer {KEY}"}
PX = ["--single-image-min-pixels", "4096", "--single-image-max-pixels", "8192", "--crop-min-pixels", "4096",
      "--crop-max-pixels", "8192"]
PXKW = dict(single_image_min_pixels=4096, single_image_max_pixels=8192, crop_min_pixels=4096, crop_max_pixels=8192)
QUESTION = "What color is the small square in the image? Answer with one word."
SYN0 = {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}


def start(ckpt, log, *flags):
    """`python infer.py --model CKPT --serve --tools ...` on a free port: (its base URL once /health answers, proc)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    cmd = [sys.executable, str(ROOT / "infer.py"), "--model", ckpt, "--serve", "--port", str(port), "--tools",
           "--enable-thinking", "--image-root", str(DEMO), "--api-key", KEY, "--max-new-tokens", "80",
           "--served-model-name", "ovis-tiny", *PX, *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.terminate()
    pytest.fail(f"the server did not answer: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tool_ckpt, tmp_path_factory):
    url, proc = start(tool_ckpt, tmp_path_factory.mktemp("serve") / "server.log", "--max-image-pixels", "400000",
                      "--max-n", "4", "--batch-size", "16", "--batch-wait-ms", "30")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def strict(tool_ckpt, tmp_path_factory):
    """A server with tight limits: one request in flight, which waits 2 s for company (a second one meets a 429)."""
    url, proc = start(tool_ckpt, tmp_path_factory.mktemp("strict") / "server.log", "--max-concurrency", "1",
                      "--batch-wait-ms", "2000", "--max-tool-calls", "2", "--max-body-bytes", "600000",
                      "--max-image-bytes", "200000")  # (the demo images: ~150 KB)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def session(tool_ckpt):
    return infer.load(tool_ckpt, device="cpu")


def data_url(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, image_part: dict, question=QUESTION, **kw):
    return client.chat.completions.create(
        model="ovis-tiny", messages=[{"role": "user", "content": [image_part, {"type": "text", "text": question}]}],
        **{"temperature": 0, **kw})


def health(url) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def settle(url, **want) -> dict:
    """GET /health until it shows `want` (5 s at most)."""
    for _ in range(100):
        h = health(url)
        if all(h[k] == v for k, v in want.items()):
            return h
        time.sleep(0.05)
    return h


def as_reply(m) -> tuple:
    return m.content, m.reasoning_content, m.model_extra["tool_trajectory"]


def test_a_tool_chat_answers_as_infer_chat(client, session):
    for image, part in (("images/syn_000.png", SYN0),
                        ("images/syn_001.png", {"type": "image_url", "image_url": {"url": data_url(
                            DEMO / "images" / "syn_001.png")}})):
        want = infer.chat(session, image=str(DEMO / image), prompt=QUESTION, enable_thinking=True, use_tools=True,
                          do_sample=False, max_new_tokens=80, **PXKW)
        got = ask(client, part, extra_body={"return_crops": True})
        msg = got.choices[0].message
        assert msg.content == want.answer and msg.reasoning_content == want.thinking
        traj = msg.model_extra["tool_trajectory"]
        assert [(c["name"], c["arguments"], c["ok"], c["result"]) for c in traj] == \
            [(c["name"], c["args"], c["ok"], c["result"]) for c in want.tool_calls]
        crops = [c["crop"] for c in traj if "crop" in c]
        assert len(crops) == len(want.crops) >= 1
        for c, w in zip(crops, want.crops):  # the crop the model saw, as a data: URL
            assert Image.open(io.BytesIO(base64.b64decode(c.split(",", 1)[1]))).tobytes() == w.tobytes()
        assert got.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish]
        assert got.usage.completion_tokens == want.n_generated and got.usage.prompt_tokens == want.prompt_len
        assert got.usage.prompt_tokens_details.image_tokens > 0 and got.model == "ovis-tiny"


def test_request_fields_reach_the_tool_loop(client, session):
    """max_completion_tokens, enable_thinking false, use_tools false, max_tool_calls 0 and seed: each as infer.chat
    with the same keyword (a seed: the same reply twice)."""
    for extra, kw in (({"max_completion_tokens": 5}, {"max_new_tokens": 5}),
                      ({"enable_thinking": False}, {"enable_thinking": False}),
                      ({"use_tools": False}, {"use_tools": False}),
                      ({"max_tool_calls": 0}, {"max_tool_calls": 0})):
        want = infer.chat(session, image=str(DEMO / "images/syn_000.png"), prompt=QUESTION, do_sample=False,
                          **{"enable_thinking": True, "use_tools": True, "max_new_tokens": 80, **PXKW, **kw})
        got = ask(client, SYN0, extra_body=extra)
        msg = got.choices[0].message
        assert (msg.content, msg.reasoning_content or "") == (want.answer, want.thinking), extra
        assert [(c["name"], c["arguments"], c["ok"], c["result"]) for c in msg.model_extra["tool_trajectory"]] == \
            [(c["name"], c["args"], c["ok"], c["result"]) for c in want.tool_calls], extra
        assert got.usage.completion_tokens == want.n_generated, extra
        if "max_completion_tokens" in extra:
            assert got.usage.completion_tokens == 5 and got.choices[0].finish_reason == "length"
        if "enable_thinking" in extra:
            assert msg.reasoning_content is None
        if "use_tools" in extra:
            assert msg.model_extra["tool_trajectory"] == []
        if "max_tool_calls" in extra:  # the trained model still calls Crop: each call is refused
            calls = msg.model_extra["tool_trajectory"]
            assert calls and all(not c["ok"] and c["result"] == tools.NO_MORE_TOOLS for c in calls)
    seeded = [ask(client, SYN0, n=3, temperature=1.5, seed=7) for _ in range(2)]
    assert [as_reply(c.message) for c in seeded[0].choices] == [as_reply(c.message) for c in seeded[1].choices]
    assert seeded[0].usage == seeded[1].usage


def sse(url, body) -> list:
    """A streamed request read as raw SSE: its chunks (each line `data: {...}`, the last `data: [DONE]`)."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=HEAD, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_a_stream_reassembles_to_the_reply(server, client):
    """Sampled choices that differ (n, a seed), thinking on and off, crops: each choice's deltas add up to its
    non-streamed reasoning, content, tool trajectory and finish; usage comes in the last chunk, then [DONE]."""
    for extra in ({"n": 4, "temperature": 1.5, "seed": 4, "return_crops": True},
                  {"n": 4, "temperature": 2.0, "top_p": 0.99, "seed": 2, "enable_thinking": False},
                  {"n": 4, "temperature": 1.5, "seed": 5, "use_tools": False}):
        body = {"model": "ovis-tiny", "max_tokens": 80, "messages": [
            {"role": "user", "content": [SYN0, {"type": "text", "text": QUESTION}]}], **extra}
        whole = httpx.post(server + "/v1/chat/completions", json=body, headers=HEAD, timeout=300).json()
        assert len({(c["message"]["content"], c["message"]["reasoning_content"]) for c in whole["choices"]}) > 1
        chunks = sse(server, {**body, "stream": True})
        got = [{"reasoning_content": None, "content": "", "tool_trajectory": [], "finish": None}
               for _ in whole["choices"]]
        assert [c["choices"][0]["delta"]["role"] for c in chunks[:len(got)]] == ["assistant"] * len(got)
        for ch in chunks[:-1]:
            assert "usage" not in ch and len(ch["choices"]) == 1
            c = ch["choices"][0]
            g, d = got[c["index"]], c["delta"]
            if "reasoning_content" in d:
                g["reasoning_content"] = (g["reasoning_content"] or "") + d["reasoning_content"]
            g["content"] += d.get("content") or ""
            g["tool_trajectory"] += [{k: v for k, v in t.items() if k != "index"} for t in d.get("tool_trajectory", [])]
            g["finish"] = c["finish_reason"] or g["finish"]
        if extra.get("enable_thinking", True):  # the reasoning token by token (thinking off: the answer at the end)
            assert sum("reasoning_content" in ch["choices"][0]["delta"] for ch in chunks[:-1]) > 10
        for g, c in zip(got, whole["choices"]):
            assert g == {**{k: c["message"][k] for k in ("reasoning_content", "content", "tool_trajectory")},
                         "finish": c["finish_reason"]}, extra
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(client, SYN0, stream=True) if ch.choices)
    assert streamed == ask(client, SYN0).choices[0].message.content  # the openai client reads the same stream


def test_the_stream_sends_only_what_no_later_token_changes(tokenizer):
    """split_output's answer changes when an `<answer>` block comes late (text before it, thinking off, a tool round):
    the deltas still add up to the finished split, whatever the text; tokens past a row's budget are not sent."""
    call = {"name": "Crop", "args": [1, 2], "ok": False, "result": "Error: a box needs exactly 4 numbers"}
    cases = [["</think>prose first <answer>X</answer> and after"], ["plain answer, no tags"], ["<answer>green"],
             ["<think>\nhm </think>\n\nsome text <answer> a <b> c </answer> tail"], ["<think>\nunfinished <answer>x"],
             ["héllo wörld 日本語 <answer>是</answer>"], ["<think>\nzoom <tool_call>Crop [1, 2]</tool_call>",
                                                       "then </think> so <answer>blue</answer>"]]
    for rounds in cases:
        cs, said, text = serve.ChoiceStream(tokenizer, M.EOS_IDS, 10 ** 6), {"reasoning_content": "", "content": ""}, ""
        for k, r in enumerate(rounds):
            for t in tokenizer(r, add_special_tokens=False)["input_ids"]:
                for key, v in cs.token(t).items():
                    said[key] += v
            text += r
            if k < len(rounds) - 1:  # a tool round: the loop appends the call's result
                cs.tool(call, None)
                text += tokenizer.decode(tools.tool_result_ids(tools.ToolResult("Crop", text=call["result"]),
                                                               tokenizer))
        for key, v in cs.deltas(text, final=True).items():
            said[key] += v
        assert (said["reasoning_content"], said["content"]) == tools.split_output(text), rounds
    cs, ids = serve.ChoiceStream(tokenizer, M.EOS_IDS, 3), tokenizer("<think>\na b c d e f")["input_ids"]
    sent = [cs.token(t) for t in ids]
    assert sent[3:] == [{}] * (len(ids) - 3)
    assert "".join(d.get("reasoning_content", "") for d in sent) == tools.split_output(tokenizer.decode(ids[:3]))[0]


def test_concurrent_clients_get_what_they_get_one_by_one_in_shared_batches(server, client):
    parts = [{"type": "image_url", "image_url": {"url": f"images/syn_00{k}.png"}} for k in range(4)]
    alone = [ask(client, p).choices[0].message for p in parts]
    assert health(server)["largest_batch"] == 1
    got = [None] * 16

    def one(k):
        got[k] = ask(client, parts[k % 4]).choices[0].message

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, m in enumerate(got):
        assert as_reply(m) == as_reply(alone[k % 4])
    assert health(server)["largest_batch"] > 1  # decoded together, not one after another


def test_bad_requests_get_their_status_and_leave_no_slot_taken(server, client):
    big = io.BytesIO()
    Image.new("RGB", (1000, 800)).save(big, format="PNG")
    big_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    broken = png.getvalue()[:33] + b"\0" * 4 + png.getvalue()[37:]  # PIL raises SyntaxError on it, not OSError
    ok = {"model": "ovis-tiny", "messages": [{"role": "user", "content": [SYN0, {"type": "text", "text": "Hi"}]}],
          "max_tokens": 4}

    def with_image(url):
        return {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": "Hi"}]}]}

    cases = [(b'{"model": "ovis-tiny", "messages": [', HEAD, 400, "not valid JSON"),
             (with_image("data:image/png;base64,!!not-base64!!"), HEAD, 400, "not valid base64"),
             (with_image("../../README.md"), HEAD, 400, "outside the server's --image-root"),
             (with_image("https://example.com/a.png"), HEAD, 400, "the server fetches nothing"),
             (with_image(big_url), HEAD, 413, "over 400000 pixels"),
             ({**ok, "model": "gpt-4"}, HEAD, 404, "model 'gpt-4' is not served here"),
             (ok, {}, 401, "missing or wrong API key"),
             (ok, {"Authorization": "Bearer nope"}, 401, "missing or wrong API key"),
             ({**ok, "n": 9}, HEAD, 400, "n: 9 is not in 1..4"),
             ({**ok, "max_tokens": 10_000}, HEAD, 400, "max_tokens: 10000 is not in 1..80"),
             ({**ok, "max_tokens": 0}, HEAD, 400, "max_tokens: 0 is not in 1..80"),
             ({**ok, "max_completion_tokens": 0}, HEAD, 400, "max_completion_tokens: 0 is not in 1..80"),
             ({**ok, "max_tool_calls": 6}, HEAD, 400, "max_tool_calls: 6 is not in 0..5"),  # the server's default
             ({**ok, "temperature": "hot"}, HEAD, 422, "temperature: 'hot' has the wrong type"),
             ({**ok, "stream": "false"}, HEAD, 422, "stream: 'false' has the wrong type"),
             ({**ok, "messages": [{"role": "tool", "content": "x"}]}, HEAD, 400, "role must be system, user"),
             # past the concurrency slot: these once raised plain exceptions and kept their slot for good
             ({**ok, "seed": 2 ** 64}, HEAD, 400, "seed: 18446744073709551616 is not in 0.."),
             (with_image("images/syn\u0000.png"), HEAD, 400, "not a usable path (embedded null byte)"),
             (with_image("x" * 300 + ".png"), HEAD, 400, "not a usable path ([Errno 36] File name too long"),
             (with_image("data:image/png;base64," + base64.b64encode(broken).decode()), HEAD, 400,
              "not a readable image (SyntaxError: broken PNG file")]
    for body, headers, status, message in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server + "/v1/chat/completions", content=raw, headers={**headers, "content-type":
                                                                                 "application/json"}, timeout=60)
        assert r.status_code == status, (message, r.text)
        err = r.json()["error"]
        assert message in err["message"] and {"message", "type", "param", "code"} <= set(err), r.text
        assert health(server)["in_flight"] == 0, message
        assert ask(client, SYN0, max_tokens=2).choices
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/health", 405)):
        r = httpx.request(method, server + path, headers=HEAD, timeout=10)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["ovis-tiny"]


def test_a_bug_is_a_500_error_object_and_frees_its_slot(monkeypatch):
    """An exception no check foresaw (here: settings_of itself failing) answers 500 with an error object and gives
    the slot back (in process: the app over a session that is never reached)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    served = serve.Served(SimpleNamespace(vllm=None), "m", None, None, serve.Limits(max_concurrency=1))
    monkeypatch.setattr(serve, "settings_of", lambda *a: 1 / 0)
    with TestClient(serve.app(served), raise_server_exceptions=False) as c:
        for _ in range(3):  # past --max-concurrency 1: the slot came back each time
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
            assert "ZeroDivisionError" in r.json()["error"]["message"]
        assert c.get("/health").json()["in_flight"] == 0


def test_the_limits_follow_the_flags(strict):
    """--max-concurrency (429 while one runs), --max-tool-calls (the most a request may ask), --max-body-bytes
    (413, with a length or chunked), --max-image-bytes (413)."""
    body = {"model": "ovis-tiny", "max_tokens": 4, "max_tool_calls": 2,
            "messages": [{"role": "user", "content": [SYN0, {"type": "text", "text": "Hi"}]}]}
    first = []
    t = threading.Thread(target=lambda: first.append(httpx.post(strict + "/v1/chat/completions", json=body,
                                                                headers=HEAD, timeout=120)))
    t.start()
    assert settle(strict, in_flight=1)["in_flight"] == 1  # it waits 2 s for company before decoding
    r = httpx.post(strict + "/v1/chat/completions", json=body, headers=HEAD, timeout=60)
    assert r.status_code == 429 and "requests in flight (--max-concurrency)" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "rate_limit_error"
    t.join()
    assert first[0].status_code == 200 and first[0].json()["choices"], first[0].text  # 2 tool calls: allowed
    noise = io.BytesIO()
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(noise, format="PNG")  # ~270 KB, 90000 px
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        noise.getvalue()).decode()}}
    huge = json.dumps({**body, "messages": [{"role": "user", "content": "x" * 700_000}]}).encode()
    for content, status, message in (
            (json.dumps({**body, "max_tool_calls": 3}).encode(), 400, "max_tool_calls: 3 is not in 0..2"),
            (json.dumps({**body, "messages": [{"role": "user", "content": [image]}]}).encode(), 413,
             "image over 200000 bytes"),
            (huge, 413, "request body over 600000 bytes"),
            ((huge[k:k + 65536] for k in range(0, len(huge), 65536)), 413, "request body over 600000 bytes")):
        r = httpx.post(strict + "/v1/chat/completions", content=content, timeout=60,
                       headers={**HEAD, "content-type": "application/json"})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert settle(strict, in_flight=0)["in_flight"] == 0


def test_a_client_that_drops_stops_its_generation(server, client):
    """Mid-stream, or before its stream started (gone while the server read its image): the rows stop (GET /health's
    `stopped` counts them), nothing stays in flight or decoding, and the next request is served."""
    body = {"model": "ovis-tiny", "stream": True, "max_tokens": 80, "temperature": 0,
            "messages": [{"role": "user", "content": [SYN0, {"type": "text", "text": QUESTION}]}]}
    stopped = health(server)["stopped"]
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60, headers=HEAD) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) > 6:
                break  # the client leaves here, some 50 tokens and a Crop before the end
    h = settle(server, in_flight=0, decoding=0, stopped=stopped + 1)
    assert h["status"] == "ok" and (h["in_flight"], h["decoding"], h["stopped"]) == (0, 0, stopped + 1), h
    raw = json.dumps(body).encode()  # the whole request, then the socket closes before any answer
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
    h = settle(server, in_flight=0, decoding=0, stopped=stopped + 2)
    assert (h["in_flight"], h["decoding"], h["stopped"]) == (0, 0, stopped + 2), h
    assert ask(client, SYN0).choices[0].message.content
