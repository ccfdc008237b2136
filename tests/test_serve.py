"""`infer.py --serve` for real: the server started as a user starts it (a subprocess on 127.0.0.1), talked to with the
real `openai` client and raw HTTP: a tool-using chat answers as infer.chat does, a stream reassembles to the same
reply, 16 concurrent clients get what they get one by one, every bad input gets its status and OpenAI error object
and the next request is served, a client that drops mid-stream leaves the server healthy."""

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
from _util import DEMO, ROOT

openai = pytest.importorskip("openai") if not os.environ.get("CI") else __import__("openai")
httpx = pytest.importorskip("httpx") if not os.environ.get("CI") else __import__("httpx")
KEY = "sk-test-key"
PX = ["--single-image-min-pixels", "4096", "--single-image-max-pixels", "8192", "--crop-min-pixels", "4096",
      "--crop-max-pixels", "8192"]
QUESTION = "What color is the small square in the image? Answer with one word."


@pytest.fixture(scope="module")
def server(tool_ckpt, tmp_path_factory):
    """`python infer.py --model CKPT --serve --tools ...` on a free port; its base URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    cmd = [sys.executable, str(ROOT / "infer.py"), "--model", tool_ckpt, "--serve", "--port", str(port), "--tools",
           "--enable-thinking", "--image-root", str(DEMO), "--api-key", KEY, "--max-new-tokens", "80",
           "--max-image-pixels", "400000", "--max-n", "4", "--batch-size", "16", "--batch-wait-ms", "30",
           "--served-model-name", "ovis-tiny", *PX]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu"}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def data_url(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, image_part: dict, question=QUESTION, **kw):
    return client.chat.completions.create(
        model="ovis-tiny", messages=[{"role": "user", "content": [image_part, {"type": "text", "text": question}]}],
        temperature=0, **kw)


def test_a_tool_chat_answers_as_infer_chat(client, tool_ckpt):
    session = infer.load(tool_ckpt, device="cpu")
    px = dict(single_image_min_pixels=4096, single_image_max_pixels=8192, crop_min_pixels=4096, crop_max_pixels=8192)
    for image, part in (("images/syn_000.png", {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}),
                        ("images/syn_001.png", {"type": "image_url", "image_url": {"url": data_url(
                            DEMO / "images" / "syn_001.png")}})):
        want = infer.chat(session, image=str(DEMO / image), prompt=QUESTION, enable_thinking=True, use_tools=True,
                          do_sample=False, max_new_tokens=80, **px)
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


def test_a_stream_reassembles_to_the_reply(client):
    part = {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}
    whole = ask(client, part, n=2)
    pieces = {0: ["", "", []], 1: ["", "", []]}
    usage, finish, n_chunks = None, {}, 0
    for ch in ask(client, part, n=2, stream=True):
        n_chunks += 1
        usage = ch.usage or usage
        for c in ch.choices:
            d = c.delta
            pieces[c.index][0] += d.model_extra.get("reasoning_content") or ""
            pieces[c.index][1] += d.content or ""
            pieces[c.index][2] += d.model_extra.get("tool_trajectory") or []
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert n_chunks > 20  # token by token, not one blob
    for i, ch in enumerate(whole.choices):
        assert pieces[i][0] == ch.message.reasoning_content and pieces[i][1] == ch.message.content
        assert [(c["name"], c["arguments"], c["ok"]) for c in pieces[i][2]] == \
            [(c["name"], c["arguments"], c["ok"]) for c in ch.message.model_extra["tool_trajectory"]]
        assert finish[i] == ch.finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_clients_get_what_they_get_one_by_one(client):
    parts = [{"type": "image_url", "image_url": {"url": f"images/syn_00{k}.png"}} for k in range(4)]
    alone = [ask(client, p).choices[0].message for p in parts]
    got = [None] * 16

    def one(k):
        got[k] = ask(client, parts[k % 4]).choices[0].message

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, m in enumerate(got):
        want = alone[k % 4]
        assert (m.content, m.reasoning_content, m.model_extra["tool_trajectory"]) == \
            (want.content, want.reasoning_content, want.model_extra["tool_trajectory"])


def test_bad_requests_get_their_status_and_the_next_is_served(server, client):
    big = io.BytesIO()
    Image.new("RGB", (1000, 800)).save(big, format="PNG")
    big_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    ok = {"model": "ovis-tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}, {"type": "text", "text": "Hi"}]}],
        "max_tokens": 4}
    head = {"Authorization": f"Bearer {KEY}"}

    def with_image(url):
        return {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": "Hi"}]}]}

    cases = [(b'{"model": "ovis-tiny", "messages": [', head, 400, "not valid JSON"),
             (with_image("data:image/png;base64,!!not-base64!!"), head, 400, "not valid base64"),
             (with_image("../../README.md"), head, 400, "outside the server's --image-root"),
             (with_image("https://example.com/a.png"), head, 400, "the server fetches nothing"),
             (with_image(big_url), head, 413, "over 400000 pixels"),
             ({**ok, "model": "gpt-4"}, head, 404, "model 'gpt-4' is not served here"),
             (ok, {}, 401, "missing or wrong API key"),
             (ok, {"Authorization": "Bearer nope"}, 401, "missing or wrong API key"),
             ({**ok, "n": 9}, head, 400, "n: 9 is not in 1..4"),
             ({**ok, "max_tokens": 10_000}, head, 400, "max_tokens: 10000 is not in 1..80"),
             ({**ok, "temperature": "hot"}, head, 422, "temperature: 'hot' has the wrong type"),
             ({**ok, "messages": [{"role": "tool", "content": "x"}]}, head, 400, "role must be system, user")]
    for body, headers, status, message in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server + "/v1/chat/completions", content=raw, headers={**headers, "content-type":
                                                                                 "application/json"}, timeout=60)
        assert r.status_code == status, (message, r.text)
        err = r.json()["error"]
        assert message in err["message"] and {"message", "type", "param", "code"} <= set(err), r.text
        assert ask(client, {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}, max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["ovis-tiny"]


def test_a_client_that_drops_mid_stream_leaves_the_server_healthy(server, client):
    body = {"model": "ovis-tiny", "stream": True, "max_tokens": 80, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}, {"type": "text", "text": QUESTION}]}]}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) > 6:
                break  # the client leaves here
    health = httpx.get(server + "/health", timeout=10).json()
    assert health["status"] == "ok"
    for _ in range(50):  # its rows are stopped: nothing stays in flight
        if httpx.get(server + "/health", timeout=10).json()["in_flight"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(server + "/health", timeout=10).json()["in_flight"] == 0
    assert ask(client, {"type": "image_url", "image_url": {"url": "images/syn_000.png"}}).choices[0].message.content
