"""Video samples in training, as the official trainer takes them (`video_frames` or a `video` file, one `<video>` in a
human turn): the official frame choice, the official rendering (golden set A's video prompt), the length pass,
truncation that drops the whole video, `data.py check --config`, and mixed image / video / text rows at ZeRO-3."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import data_check
import model as M
from _util import DEMO, ROOT, cfg_for, launch, metrics

GOLD = ROOT / "tests" / "fixtures" / "golden_a"
FRAMES = ["vid0_f0.png", "vid0_f1.png", "vid0_f2.png"]
VIDEO_BUDGET = dict(video_min_pixels=4096, video_max_pixels=20480, min_frames=2, max_frames=8)


def video_sample(**media):
    return {"id": "v", **media, "conversations": [{"from": "human", "value": "<video>\nDescribe the video."},
                                                 {"from": "gpt", "value": "A pattern."}]}


def test_frame_choice_is_the_official_rule():
    assert data.sample_frames(5, 2, 8) == [0, 1, 2, 3, 4]  # inside the range: every frame, as is
    assert data.sample_frames(10, 4, 4) == [1, 3, 6, 9]  # mid-points of 4 even strides of 2.5 frames
    assert data.sample_frames(3, 8, 8) == [0, 0, 1, 1, 2, 2, 2, 2]  # too few: strides shorter than a frame
    assert data.sample_frames(1, 1, 1) == [0]


def test_video_sample_is_the_official_rendering(tokenizer):
    """The golden video prompt (the official preprocess_inputs on these frames) is the start of the training encoding:
    same ids (the inserted empty think included), same pixels, one grid [T, h, w]; only the answer is learned."""
    case = next(c for c in json.loads((GOLD / "inputs.json").read_text()) if c["name"] == "video")
    gold = load_file(str(GOLD / "inputs.safetensors"))
    s = video_sample(video_frames=FRAMES)
    out = data.encode_sample(s, tokenizer, GOLD / "images", **VIDEO_BUDGET)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert ids[:len(case["input_ids"])] == case["input_ids"] and out["grid_thws"].tolist() == [[3, 4, 4]]
    assert torch.equal(out["pixel_values"], gold["video.pixel_values"])
    learned = [i for i, lab in zip(ids, labels) if lab != M.IGNORE_ID]
    assert tokenizer.decode(learned) == "A pattern.<|im_end|>"
    # the same sample as a prompt (infer.py requests: prompt_messages -> build_inputs) is the golden prompt exactly
    msgs = data.prompt_messages(s, GOLD / "images", data.Budgets(**VIDEO_BUDGET))
    p = M.build_inputs(msgs, tokenizer, min_pixels=4096, max_pixels=20480)
    assert p["input_ids"][0].tolist() == case["input_ids"]
    assert torch.equal(p["pixel_values"], gold["video.pixel_values"])
    lite = data.encode_sample(s, tokenizer, GOLD / "images", with_pixels=False, **VIDEO_BUDGET)
    assert lite["input_ids"].tolist() == ids and lite["grid_thws"].tolist() == [[3, 4, 4]]
    # frames resampled to max_frames by the official rule: 10 frames -> [1, 3, 6, 9]
    ten = [FRAMES[i % 3] for i in range(10)]
    out = data.encode_sample(video_sample(video_frames=ten), tokenizer, GOLD / "images",
                             **{**VIDEO_BUDGET, "min_frames": 4, "max_frames": 4})
    frames = [Image.open(GOLD / "images" / ten[i]).convert("RGB") for i in (1, 3, 6, 9)]
    assert torch.equal(out["pixel_values"], M.preprocess_video(frames, 4096, 20480)[0])
    assert out["grid_thws"].tolist() == [[4, 4, 4]]
    with pytest.raises(data.SampleError, match="field=video: a sample has images or one video, not both"):
        data.encode_sample({**s, "image": "img0.png"}, tokenizer, GOLD / "images")
    with pytest.raises(data.SampleError, match=r"field=video: 1 videos but 2 <video> placeholders"):
        two = [{"from": "human", "value": "<video><video>?"}, s["conversations"][1]]
        data.encode_sample({**s, "conversations": two}, tokenizer, GOLD / "images")


def test_video_file_reads_like_its_frames(tokenizer, tmp_path, monkeypatch):
    """A `video` file (PyAV; lossless ffv1 here) gives the same ids and pixels as its frames; the length pass counts
    frames without decoding; without PyAV the error names the sample and says what to do."""
    av = pytest.importorskip("av") if not __import__("os").environ.get("CI") else __import__("av")
    frames = [Image.open(GOLD / "images" / f).convert("RGB") for f in FRAMES]
    with av.open(str(tmp_path / "v.mkv"), "w") as c:
        st = c.add_stream("ffv1", rate=3)
        st.width, st.height, st.pix_fmt = frames[0].width, frames[0].height, "bgr0"
        for f in frames:
            for p in st.encode(av.VideoFrame.from_image(f).reformat(format="bgr0")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    for f in FRAMES:
        shutil.copy(GOLD / "images" / f, tmp_path / f)
    want = data.encode_sample(video_sample(video_frames=FRAMES), tokenizer, tmp_path, **VIDEO_BUDGET)
    got = data.encode_sample(video_sample(video="v.mkv"), tokenizer, tmp_path, **VIDEO_BUDGET)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])
    lite = data.encode_sample(video_sample(video="v.mkv"), tokenizer, tmp_path, with_pixels=False, **VIDEO_BUDGET)
    assert torch.equal(lite["grid_thws"], want["grid_thws"])
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(data.SampleError, match=r"id=v field=video: reading the video file .*v\.mkv needs PyAV "
                                               r"\(pip install av\); or give its frames as video_frames"):
        data.encode_sample(video_sample(video="v.mkv"), tokenizer, tmp_path, **VIDEO_BUDGET)


def test_truncated_video_file_is_a_named_error(tokenizer, tmp_path):
    """An mp4 whose header promises 6 frames but whose data holds fewer (a cut download) must not train on fewer
    frames than its grid says: decoding finds it, and it is a SampleError naming the field."""
    av = pytest.importorskip("av") if not __import__("os").environ.get("CI") else __import__("av")
    rng = np.random.default_rng(0)
    with av.open(str(tmp_path / "v.mp4"), "w", options={"movflags": "faststart"}) as c:  # frame count up front
        st = c.add_stream("mpeg4", rate=3)
        st.width = st.height = 64
        st.pix_fmt = "yuv420p"
        for _ in range(6):
            img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            for p in st.encode(av.VideoFrame.from_image(img)):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    whole = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[:len(whole) * 6 // 10])
    budget = {**VIDEO_BUDGET, "max_frames": 6}
    assert data.encode_sample(video_sample(video="v.mp4"), tokenizer, tmp_path, **budget)["grid_thws"][0, 0] == 6
    with pytest.raises(data.SampleError, match=r"id=v field=video: .*cut\.mp4: 6 frames in its metadata, \d of the "
                                               r"6 sampled frames decoded"):
        data.encode_sample(video_sample(video="cut.mp4"), tokenizer, tmp_path, **budget)


def test_truncation_drops_the_whole_video(tokenizer):
    s = video_sample(video_frames=FRAMES)
    full = data.encode_sample(s, tokenizer, GOLD / "images", **VIDEO_BUDGET)["input_ids"].tolist()
    inside = full.index(-303) + 5  # a cut inside the video block
    out = data.encode_sample(s, tokenizer, GOLD / "images", max_length=inside, overlong="truncate", **VIDEO_BUDGET)
    assert out["input_ids"].tolist() == full[:full.index(-303)] and out["grid_thws"] is None
    assert out["pixel_values"] is None


def test_check_with_a_run_config_reports_what_the_run_drops(tmp_path, capsys):
    long = video_sample(video_frames=FRAMES * 3)  # 9 frames, kept as is below: too long for max_length 40
    (tmp_path / "d.json").write_text(json.dumps([video_sample(video_frames=FRAMES), {**long, "id": "long"}]))
    cfg = {"data_path": str(tmp_path / "d.json"), "image_dir": str(GOLD / "images"), "max_length": 40, **VIDEO_BUDGET,
           "max_frames": 9, "tools": "Crop"}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert data_check.check(["--config", str(tmp_path / "run.json")]) == 1
    out = capsys.readouterr().out
    assert "id=long field=length: 59 tokens > max_length 40" in out and "samples 2: ok 1, bad 1, over-long 1" in out
    assert data_check.check(["--config", str(tmp_path / "run.json"), "--max_length", "200"]) == 0  # a flag overrides it


def test_mixed_image_video_text_rows_train_on_two_ranks_zero3(base, small_data, tmp_path):
    """ZeRO-3, 2 ranks: rows holding images, a video or text only pack together and train (a rank whose row has no
    visual still runs the ViT); the export reloads."""
    img_dir = tmp_path / "media"
    shutil.copytree(DEMO, img_dir)
    for f in FRAMES:
        shutil.copy(GOLD / "images" / f, img_dir / f)
    samples = json.loads(Path(small_data).read_text()) + [
        {**video_sample(video_frames=FRAMES[:k + 1]), "id": f"video{k}"} for k in range(3)]
    (tmp_path / "mixed.json").write_text(json.dumps(samples))
    c = cfg_for(base, str(tmp_path / "mixed.json"), tmp_path / "out", image_dir=str(img_dir), max_tokens=500,
                zero_config=str(ROOT / "zero_configs" / "zero3.json"), max_steps=4, **{**VIDEO_BUDGET, "min_frames": 1})
    stdout = launch("torchrun", c, tmp_path)
    assert "skipped 0" in stdout and "'images':" in stdout
    rec = metrics(tmp_path / "out")
    assert len(rec) == 4 and all(np.isfinite(r["loss"]) and r["targets"] > 0 for r in rec)
    assert rec[-1]["loss"] < rec[0]["loss"]
    assert M.Ovis25.from_pretrained(str(tmp_path / "out" / "final")) is not None
