"""report.py: the step files re-read equal the rollouts they came from, and the page, rendered by a real browser
(headless Chromium, Debian's `chromium` package), shows each box in its colour exactly where it belongs on the image;
model text is shown escaped, never run; steps newest first; no external URL; no torn file with two writers. Rollouts
are built from real crops (tools.Crop) and, in the last two tests, come from the real tool loop of a tiny model that
learned to call Crop (grpo.py's rollout path, infer.py's records)."""

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import grpo
import infer
import report
import scoring
import tools

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BG = (40, 90, 160)  # the synthetic image: a blue field (neither box colour) with a yellow square
PRED, GOLD = (255, 0, 255), (0, 200, 0)
SCRIPT = "<script>document.body.innerHTML = 'PWNED'</script>"


def synthetic() -> Image.Image:
    img = Image.new("RGB", (320, 240), BG)
    ImageDraw.Draw(img).rectangle([210, 110, 270, 170], fill=(230, 200, 30))
    return img


def make_rollout(img, calls, fmt="pixel", text="", n=40) -> tools.Rollout:
    """A Rollout as run_tool_loop fills it, each call really executed by the Crop tool on `img`."""
    reg, r = tools.Registry([tools.Crop(bbox_format=fmt)]), tools.Rollout(finish="eos", n_generated=n)
    for call in calls:
        res = reg.execute(f"<tool_call>{call}</tool_call>", [img], ["syn.png"])
        r.tool_calls.append({"name": res.name, "args": tools.parse_tool_call(call).args, "ok": not res.error,
                             "result": res.text})
        r.crops += [res.image] if res.image is not None else []
        r.text += f"<tool_call>{call}</tool_call>" + ("<image>" if res.image else f"<tool_response>{res.text}"
                                                                                  "</tool_response>")
    r.text = f"<think>Zoom in. {r.text}{text}</think>\n\n<answer>yellow</answer>"
    r.thinking, r.answer = tools.split_output(r.text)
    r.image_size, r.bbox_format = img.size, fmt
    return r


def check_row(row, r, sample, *, rewards, advantage, step, out_dir):
    """A re-read row equals the rollout, the sample and the scores it was written from; its files hold its images."""
    assert row["step"] == step and row["id"] == sample["id"]
    assert row["thinking"] == r.thinking and row["answer"] == r.answer and row["text"] == r.text
    assert row["tool_calls"] == r.tool_calls and row["length"] == r.n_generated and row["finish"] == r.finish
    assert row["image_size"] == list(r.image_size) and row["bbox_format"] == r.bbox_format
    assert row["gold_answer"] == sample.get("answer") and row["gold_bbox"] == sample.get("bbox")
    assert row["rewards"] == rewards and row["advantage"] == advantage
    assert len(row["crops"]) == len(r.crops)
    for name, crop in zip(row["crops"], r.crops):
        with Image.open(out_dir / name) as saved:
            assert saved.size == crop.size and saved.convert("RGB").tobytes() == crop.convert("RGB").tobytes()
    with Image.open(out_dir / row["image_file"]) as copy:
        assert copy.size == tuple(r.image_size)


def chromium(*args, timeout=120) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        msg = "headless Chromium is not installed (apt-get install -y chromium): the page is not checked in a browser"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    prof = Path(os.environ.get("TMPDIR", "/tmp")) / f"chromium-profile-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(prof, ignore_errors=True)
    prof.mkdir(parents=True)
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={prof}", "--force-device-scale-factor=1",
                               "--hide-scrollbars", *args], capture_output=True, text=True, encoding="utf-8",
                              timeout=timeout, check=True)
    finally:
        shutil.rmtree(prof, ignore_errors=True)


def screenshot(page: Path, size=(1200, 1000)) -> Image.Image:
    png = page.with_suffix(".png")
    chromium(f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri())
    with Image.open(png) as im:
        assert im.size == size
        return im.convert("RGB")


def on_screen(x, y, image_size):
    """Where pixel (x, y) of the first row's image lands: it is shown DISPLAY_WIDTH px wide at FIRST_IMAGE_AT."""
    s = report.DISPLAY_WIDTH / image_size[0]
    return report.FIRST_IMAGE_AT[0] + x * s, report.FIRST_IMAGE_AT[1] + y * s


def near(shot, xy, rgb, r=1, tol=12) -> bool:
    """Some pixel within r of xy has colour rgb (each channel within tol)."""
    x, y = round(xy[0]), round(xy[1])
    return any(all(abs(a - b) <= tol for a, b in zip(shot.getpixel((x + dx, y + dy)), rgb))
               for dx in range(-r, r + 1) for dy in range(-r, r + 1))


def assert_box_drawn(shot, box_px, image_size, colour, other):
    """`colour` on the middle of each edge of the pixel box, neither colour at its centre."""
    x1, y1, x2, y2 = box_px
    for x, y in (((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2), (x2, (y1 + y2) / 2)):
        assert near(shot, on_screen(x, y, image_size), colour), (box_px, (x, y), colour)
    centre = on_screen((x1 + x2) / 2, (y1 + y2) / 2, image_size)
    assert not near(shot, centre, colour, r=2) and not near(shot, centre, other, r=2), box_px


# ----------------------------------------------------------------------------------------------------------------
# fast: rollouts built from real crops

PRED_BOXES, GOLD_BOX = [[40, 30, 150, 120], [20, 150, 100, 220]], [200, 100, 280, 180]  # pixels of synthetic()


@pytest.mark.parametrize("fmt", ["pixel", "norm"])
def test_rows_round_trip_and_the_browser_shows_each_box_where_it_belongs(tmp_path, fmt):
    img, out = synthetic(), tmp_path / "run" / "rollouts"
    W, H = img.size
    in_fmt = lambda b: b if fmt == "pixel" else [b[0] / W, b[1] / H, b[2] / W, b[3] / H]  # noqa: E731
    calls = [f"Crop {in_fmt(PRED_BOXES[0])}", "Crop [1, 2]", f"Crop {in_fmt(PRED_BOXES[1])}"]  # the 2nd is no box
    r = make_rollout(img, calls, fmt)
    sample = {"id": "syn_0", "answer": "yellow", "bbox": in_fmt(GOLD_BOX)}
    rewards = {"accuracy": 1.0, "iou": 0.25, "format": float("nan")}
    row = report.rollout_row(r, sample, rewards=rewards, advantage=0.75, step=7, image_path="images/syn.png",
                             prompt_text="What colour is the square?", reward=1.25)
    path = report.write_step(out, 7, [(row, img, r.crops)])
    assert path == out / "step_7.jsonl" and len(r.crops) == 2 and [c["ok"] for c in r.tool_calls] == [1, 0, 1]
    (back,) = report.read_rows(path)
    check_row(back, r, sample, rewards={"accuracy": 1.0, "iou": 0.25, "format": None}, advantage=0.75, step=7,
              out_dir=out)  # NaN is written as null: the file is strict JSON
    assert back["prompt"] == "What colour is the square?" and back["image"] == "images/syn.png"
    assert back["reward"] == 1.25
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert "not drawn: a box needs exactly 4 numbers" in (out / "index.html").read_text(encoding="utf-8")
    shot = screenshot(out / "index.html")
    for box in PRED_BOXES:
        assert_box_drawn(shot, box, img.size, PRED, GOLD)
    assert_box_drawn(shot, GOLD_BOX, img.size, GOLD, PRED)
    for xy in ((3, 3), (316, 3), (3, 236), (316, 236), (180, 200), (300, 60)):  # no box there: the image itself
        assert near(shot, on_screen(*xy, img.size), BG, tol=16), xy
        assert not near(shot, on_screen(*xy, img.size), PRED, r=3), xy
        assert not near(shot, on_screen(*xy, img.size), GOLD, r=3), xy
    below = on_screen(160, H + 4, img.size)  # just below the image: it is exactly DISPLAY_WIDTH wide
    assert not near(shot, below, BG, r=0, tol=16) and near(shot, on_screen(160, H - 2, img.size), BG, r=0, tol=16)


def test_model_text_is_shown_escaped_never_run(tmp_path):
    img, out = synthetic(), tmp_path / "rollouts"
    r = make_rollout(img, ["Crop [40, 30, 150, 120]"], text=f" {SCRIPT} <b>bold</b> a < b & c")
    r.answer = f"{SCRIPT}<img src=x onerror=alert(1)>"
    sample = {"id": f"id{SCRIPT}", "answer": "<i>yellow</i>", "bbox": [200, 100, 280, 180]}
    row = report.rollout_row(r, sample, rewards={"<u>x</u>": 1.0}, advantage=None, step=1, image_path=None,
                             prompt_text=f"Q? {SCRIPT}")
    report.write_step(out, 1, [(row, img, r.crops)], kind="eval")
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page and "<b>" not in page and "<i>" not in page and "<u>" not in page
    assert "&lt;script&gt;document.body.innerHTML = &#x27;PWNED&#x27;&lt;/script&gt;" in page
    assert "a &lt; b &amp; c" in page
    dom = chromium("--dump-dom", (out / "index.html").resolve().as_uri()).stdout  # what the browser built
    assert "<script" not in dom and "<b>" not in dom and "<img src=\"x\"" not in dom
    assert dom.count("&lt;script&gt;document.body.innerHTML") >= 4 and "step 1 · eval" in dom  # text, answer, id, Q


def test_self_contained_newest_first_older_linked(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PAGE_STEPS", 4)
    img, out = synthetic(), tmp_path / "rollouts"
    r = make_rollout(img, ["Crop [40, 30, 150, 120]"])
    for step, kind in ((2, "train"), (10, "train"), (1, "train"), (10, "eval"), (0, "eval")):  # out of order
        row = report.rollout_row(r, {"id": f"s{step}{kind}"}, rewards={"accuracy": 1.0}, advantage=None,
                                 step=step, image_path=None, prompt_text="q")
        report.write_step(out, step, [(row, img, r.crops)], kind=kind)
    page = (out / "index.html").read_text(encoding="utf-8")
    order = [page.index(f'<section id="{n}">') for n in ("eval_step_10", "step_10", "step_2", "step_1")]
    assert order == sorted(order)  # numerically newest first (10 before 2), the eval after a step's update first
    assert 'id="eval_step_0"' not in page and '<a href="eval_step_0.jsonl">' in page  # beyond PAGE_STEPS: linked
    assert "http://" not in page and "https://" not in page and 'src="/' not in page and "url(" not in page
    srcs = page.split('src="')[1:] + page.split('href="')[1:]
    assert srcs and all(s.startswith(("data:image/jpeg;base64,", "eval_step_0.jsonl")) for s in srcs)
    report.drop_after(out, 2)  # a resumed run from step 2's checkpoint
    page = (out / "index.html").read_text(encoding="utf-8")
    assert not (out / "step_10.jsonl").exists() and "step_10" not in page and 'id="step_2"' in page


def test_two_writers_never_leave_a_torn_page(tmp_path):
    img, out = synthetic(), tmp_path / "rollouts"
    r = make_rollout(img, ["Crop [40, 30, 150, 120]"])
    row = lambda step: report.rollout_row(r, {"id": f"s{step}"}, rewards={"accuracy": 0.5}, advantage=0.1,  # noqa
                                          step=step, image_path=None, prompt_text="q")
    report.write_step(out, 0, [(row(0), img, r.crops)])
    errors = []

    def writer(steps):
        try:
            for s in steps:
                report.write_step(out, s, [(row(s), img, r.crops)])
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(range(k, 13, 2),)) for k in (1, 2)]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads) or not reads:
        page = (out / "index.html").read_text(encoding="utf-8")
        assert page.startswith("<!doctype html>") and page.endswith("</html>\n")
        for p in out.glob("step_*.jsonl"):
            assert all(json.loads(x)["id"] == f"s{p.stem[5:]}" for x in p.read_text(encoding="utf-8").splitlines())
        reads += 1
    for t in threads:
        t.join()
    assert not errors and reads > 1
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(f'<section id="step_{s}">' in page for s in range(13))  # the last page written saw every file
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    report.write_step(out, 12, [(row(99), img, r.crops)])  # a resumed run writes step 12 again: replaced whole
    assert [x["id"] for x in report.read_rows(out / "step_12.jsonl")] == ["s99"]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<td>s99</td>" in page and "<td>s12</td>" not in page  # its cached section went with the old content
    assert len(list((out / "sections").iterdir())) == 13


def test_a_step_file_landing_while_the_page_is_built_is_on_it(tmp_path, monkeypatch):
    """The race two writers can run into, made certain: another writer's step file lands after this writer listed
    the files, and that writer's own page was renamed first. The page renamed last must still show it."""
    img, out = synthetic(), tmp_path / "rollouts"
    r = make_rollout(img, ["Crop [40, 30, 150, 120]"])
    row = lambda step: report.rollout_row(r, {"id": f"s{step}"}, rewards={}, advantage=None,  # noqa: E731
                                          step=step, image_path=None, prompt_text="q")
    real, landed = report._section, []

    def section(out_dir, name, heading):
        if not landed:
            landed.append(1)
            line = json.dumps({**row(5), "image_file": None}) + "\n"
            report._write_atomic(out_dir / "step_5.jsonl", line.encode())
        return real(out_dir, name, heading)

    monkeypatch.setattr(report, "_section", section)
    report.write_step(out, 4, [(row(4), img, r.crops)])
    page = (out / "index.html").read_text(encoding="utf-8")
    assert landed and '<section id="step_5">' in page and '<section id="step_4">' in page


# ----------------------------------------------------------------------------------------------------------------
# real runs: the tiny model that learned to call Crop (conftest.tool_ckpt)

@pytest.fixture(scope="module")
def demo_rollouts(tool_ckpt, tokenizer):
    """GRPO's rollout path on the demo's first prompt: 2 greedy completions that call Crop, scored and advantaged."""
    import model as M

    m = M.Ovis25.from_pretrained(tool_ckpt).eval()
    cfg = grpo.Config(image_dir=str(DEMO), single_image_min_pixels=4096, single_image_max_pixels=8192,
                      crop_min_pixels=4096, crop_max_pixels=8192)
    sample = json.loads((DEMO / "grpo.json").read_text(encoding="utf-8"))[0]
    reg = tools.load_tools()
    inp, images, keys = grpo.prompt_inputs(sample, cfg, tokenizer, reg)
    with torch.no_grad():
        rolls = tools.run_tool_loop(m, tokenizer, [inp], images=[images], keys=[keys], registry=reg, max_new_tokens=80,
                                    crop_min_pixels=4096, crop_max_pixels=8192, group=2)
    assert all([c["name"] for c in r.tool_calls] == ["Crop"] and r.tool_calls[0]["ok"] for r in rolls)
    fns = scoring.parse_scorers("format|accuracy|iou:0.5")
    (group,) = grpo.score(rolls, [sample], fns, 2)
    adv = grpo.group_advantages(group["reward"][None], True)[0]
    return m, sample, images[0], group, adv


def test_real_rollouts_step_file_and_page(demo_rollouts, tmp_path):
    _, sample, image, group, adv = demo_rollouts
    out, rows = tmp_path / "grpo" / "rollouts", []
    for g, r in enumerate(group["rolls"]):
        rewards = {k: float(v[g]) for k, v in group["parts"].items()}
        rows.append((report.rollout_row(r, sample, rewards=rewards, advantage=float(adv[g]), step=3,
                                        image_path=sample["image"], prompt_text=report.prompt_text(sample),
                                        reward=float(group["reward"][g])), image, r.crops))
    report.write_step(out, 3, rows)
    back = report.read_rows(out / "step_3.jsonl")
    assert len(back) == 2 and back[0]["prompt"].endswith("Answer with one word.")
    for g, (row, r) in enumerate(zip(back, group["rolls"])):
        check_row(row, r, sample, rewards={k: float(v[g]) for k, v in group["parts"].items()},
                  advantage=float(adv[g]), step=3, out_dir=out)
        assert row["reward"] == pytest.approx(float(group["reward"][g]))
    shot = screenshot(out / "index.html")
    r = group["rolls"][0]
    assert_box_drawn(shot, tools.to_pixels(r.tool_calls[0]["args"], r.image_size), r.image_size, PRED, GOLD)
    assert_box_drawn(shot, sample["bbox"], r.image_size, GOLD, PRED)
    assert not near(shot, on_screen(60, 200, r.image_size), PRED, r=3)


def test_real_inference_records_page(demo_rollouts, tmp_path, tokenizer):
    """infer.py's records of the same model: the page recomputes the crops from the image and each call's box."""
    m, sample, image, _, _ = demo_rollouts
    session = infer.Session(m, tokenizer)
    req = {**sample, "id": "q0"}
    (r,) = infer.chat_batch(session, [req], str(DEMO), enable_thinking=True, use_tools=True, max_new_tokens=80,
                            single_image_min_pixels=4096, single_image_max_pixels=8192, crop_min_pixels=4096,
                            crop_max_pixels=8192,
                            do_sample=False)
    recs = [infer.record(req, r, scoring.parse_scorers("accuracy|iou")), {"id": "q.jsonl:4", "error": "bad line"}]
    box = r.tool_calls[0]["args"]
    assert image.crop(tools.crop_box(box, image.size)).tobytes() == r.crops[0].tobytes()  # what the page shows
    page = report.write_inference_report(tmp_path / "answers.html", [req], recs, str(DEMO))
    text = page.read_text(encoding="utf-8")
    assert text.count('alt="crop of call 1"') == 1 and "error: bad line" in text and "http" not in text
    shot = screenshot(page)
    assert_box_drawn(shot, tools.to_pixels(box, image.size), image.size, PRED, GOLD)
    assert_box_drawn(shot, sample["bbox"], image.size, GOLD, PRED)
    small = report.write_inference_report(tmp_path / "first.html", [req], recs, str(DEMO), max_rows=1)
    text = small.read_text(encoding="utf-8")
    assert "2 records, the first 1 shown" in text and "<td>q0</td>" in text and "bad line" not in text


def test_curves_png_of_a_runs_metrics(tmp_path):
    """metrics.jsonl -> one PNG, a panel per metric: training steps as a line, held-out evals as points."""
    pytest.importorskip("matplotlib") if not os.environ.get("CI") else None
    recs = [{"step": s, "reward": 0.1 * s, "tool_rate": 1.0, "mean_crop_iou": None} for s in range(1, 6)]
    recs += [{"step": s, "eval_reward": 0.05 * s, "eval_mean_crop_iou": 0.1 * s} for s in (0, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = report.curves(tmp_path)
    with Image.open(png) as im:  # reward, mean_crop_iou (eval only), tool_rate: three panels of 3.2 in at 110 dpi
        assert im.format == "PNG" and im.size == (round(3 * 3.2 * 110), round(2.8 * 110))
        red = sum(1 for px in im.convert("RGB").getdata() if px[0] > 190 and px[1] < 80 and px[2] < 80)
        assert red > 50  # the eval points are drawn
