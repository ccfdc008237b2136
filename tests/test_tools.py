"""tools.py: tolerant call parsing (incl. fuzzing), Crop geometry, Identify backends, errors as results."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import scoring
import tools

DATA = Path(__file__).parent / "fixtures" / "data"
IMG = Image.new("RGB", (300, 200), (10, 20, 30))


@pytest.mark.parametrize("text, name, args", [
    ("<tool_call>Crop [1, 2, 3, 4]</tool_call>", "Crop", [1, 2, 3, 4]),
    ("Crop [1.5,2.25 ,3e1, 4.]", "Crop", [1.5, 2.25, 30.0, 4.0]),
    ("  Crop[1 2 3 4]  ", "Crop", [1, 2, 3, 4]),
    ("Identify (10, 20, 30, 40)", "Identify", [10, 20, 30, 40]),
    ("Crop 1, 2, 3, 4", "Crop", [1, 2, 3, 4]),
    ("some text <tool_call>Crop [0,0,1,1]</tool_call> more <tool_call>Identify [5, 6, 7, 8]", "Identify", [5, 6, 7, 8]),
    ('<tool_call>{"name": "Crop", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>', "Crop", {"bbox": [1, 2, 3, 4]}),
    ('{"name": "Crop", "arguments": [1, 2, 3, 4]}', "Crop", [1, 2, 3, 4]),
    ("Crop []", "Crop", []),
])
def test_parse_ok(text, name, args):
    call = tools.parse_tool_call(text)
    assert call.error is None and call.name == name and call.args == args


@pytest.mark.parametrize("text, why", [
    ("", "no tool name"), ("<tool_call></tool_call>", "no tool name"), ("[1, 2, 3, 4]", "no tool name"),
    ("Crop [a, b, c, d]", "must be numbers"), ("Crop [1, 2, 3, nan]", "must be numbers"),
    ('{"name": "Crop", "arguments": ', "not valid JSON"), ('{"arguments": [1, 2, 3, 4]}', '"name"'),
])
def test_parse_errors(text, why):
    call = tools.parse_tool_call(text)
    assert call.error and why in call.error


@pytest.mark.parametrize("box, fmt, size, expect", [
    ([10, 20, 110, 90], "pixel", (300, 200), (10, 20, 110, 90)),
    ([110, 90, 10, 20], "pixel", (300, 200), (10, 20, 110, 90)),  # swapped corners
    ([-50, -5, 400, 250], "pixel", (300, 200), (0, 0, 300, 200)),  # clamped
    ([10.2, 20.7, 109.5, 89.1], "pixel", (300, 200), (10, 20, 110, 90)),  # rounded outwards
    ([100, 100, 110, 104], "pixel", (300, 200), (89, 86, 121, 118)),  # grown to 32 around the centre
    ([0, 0, 4, 4], "pixel", (300, 200), (0, 0, 32, 32)),  # grown, shifted inside at the border
    ([298, 190, 300, 200], "pixel", (300, 200), (268, 168, 300, 200)),
    ([0, 0, 5, 5], "pixel", (20, 12), (0, 0, 20, 12)),  # image smaller than 32: the whole side
    ([0.1, 0.25, 0.5, 0.75], "norm", (300, 200), (30, 50, 150, 150)),
    ([100, 250, 500, 750], "norm1000", (300, 200), (30, 50, 150, 150)),
    ({"bbox_2d": [10, 20, 110, 90]}, "pixel", (300, 200), (10, 20, 110, 90)),
])
def test_crop_box(box, fmt, size, expect):
    assert tools.crop_box(box, size, fmt) == expect


@pytest.mark.parametrize("box", [[5, 5, 5, 50], [400, 10, 500, 50], [1, 2, 3], [1, 2, 3, float("inf")],
                                 ["a", 1, 2, 3], [True, 1, 2, 3], None, {"x": 1}])
def test_crop_box_rejects(box):
    with pytest.raises(ValueError):
        tools.crop_box(box, (300, 200))


def test_registry_crop_and_errors_are_results():
    reg = tools.load_tools()
    res = reg.execute("<tool_call>Crop [10, 20, 110, 90]</tool_call>", [IMG])
    assert res.kind == "image" and res.image.size == (100, 70) and not res.error
    for call, why in [("Crop [5, 5, 5, 50]", "zero area"), ("Zoom [1, 2, 3, 4]", "unknown tool 'Zoom'"),
                      ("Crop [1, 2]", "4 numbers"), ("", "Error")]:
        res = reg.execute(call, [IMG])
        assert res.kind == "text" and res.error and res.text.startswith("Error:") and why in res.text
    res = reg.execute("Crop [1, 2, 40, 40]", [])
    assert res.error and "no image" in res.text
    norm = tools.load_tools(bbox_format="norm")
    norm = norm.execute('{"name": "crop", "arguments": {"bbox": [0, 0, 0.5, 0.5]}}', [IMG])
    assert norm.image.size == (150, 100)


def test_identify_backends():
    reg = tools.load_tools(identify=str(DATA / "identify_map.json"))
    img = Image.new("RGB", (300, 220))
    assert reg.execute("Identify [150, 60, 250, 200]", [img], ["img3.png"]).text == "Alice"
    assert reg.execute("Identify [5, 5, 45, 45]", [img], ["some/dir/img3.png"]).text == "Bob"  # basename match
    assert reg.execute("Identify [260, 5, 290, 40]", [img], ["img3.png"]).text == "unknown"  # no overlap
    assert reg.execute("Identify [150, 60, 250, 200]", [img], ["other.png"]).text == "unknown"
    seen = []
    fn = tools.load_tools(identify=lambda im, box, key: seen.append((box, key)) or "Theo <3")
    res = fn.execute("Identify [1, 2, 50, 60]", [img], ["k.png"])
    assert res.text == "Theo \u2039" + "3" and seen == [([1.0, 2.0, 50.0, 60.0], "k.png")]  # brackets neutralised
    assert fn.execute("Identify [1, 2, 50, 60]", []).error


def test_system_prompt_describes_tools():
    p = tools.load_tools(bbox_format="norm").system_prompt()
    assert "Crop [x1, y1, x2, y2]" in p and "Identify" in p and "<tool_call>" in p and "[0, 1]" in p
    with pytest.raises(ValueError):
        tools.load_tools(bbox_format="percent")


def test_custom_tool_registration():
    class Echo(tools.Tool):
        name = "Echo"

        def run(self, args, images, keys):
            return tools.ToolResult(self.name, text=json.dumps(args))

    reg = tools.Registry([Echo()])
    assert reg.execute("echo [1, 2]").text == "[1.0, 2.0]" and reg.names() == ["Echo"]


# ---------------------------------------------------------------------------------------------------------------
# fuzzing: any string in, a result out; never an exception, never an angle bracket in a text result

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
call_like = st.builds(lambda n, a, sep, close: f"<tool_call>{n} [{sep.join(a)}]" + ("</tool_call>" if close else ""),
                      st.sampled_from(["Crop", "Identify", "crop", "Zoom", ""]),
                      st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str),
                                         st.integers(-10**6, 10**6).map(str), st.text(max_size=3)), max_size=6),
                      st.sampled_from([", ", ",", " ", " ,  "]), st.booleans())


@FUZZ
@given(st.one_of(st.text(max_size=80), call_like))
def test_fuzz_parse_and_execute(text):
    call = tools.parse_tool_call(text)
    assert isinstance(call, tools.ToolCall)
    res = tools.load_tools().execute(call, [IMG], ["img.png"])
    assert isinstance(res, tools.ToolResult)
    if res.kind == "text":
        assert "<" not in res.text and ">" not in res.text
    else:
        assert 32 <= res.image.size[0] <= 300 and 32 <= res.image.size[1] <= 200


@FUZZ
@given(st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4), st.sampled_from(tools.BBOX_FORMATS),
       st.integers(1, 400), st.integers(1, 400))
def test_fuzz_crop_geometry(box, fmt, w, h):
    try:
        x1, y1, x2, y2 = tools.crop_box(box, (w, h), fmt)
    except ValueError:
        return
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert x2 - x1 >= min(32, w) and y2 - y1 >= min(32, h)


def test_trajectory_stats_and_summary_by_hand():
    """The numbers infer.py --score and GRPO's logs report, against a hand count over three trajectories."""
    good = "<think>\nx <tool_call>Crop [0, 0, 10, 10]</tool_call><image>\n</think>\n\n<answer>green</answer>"

    def roll(text, calls, finish, n, **kw):
        said = re.sub(r"<image>|<tool_response>.*?</tool_response>", "", text)  # what the model itself wrote
        r = tools.Rollout(text=text, model_text=said, tool_calls=calls, finish=finish, n_generated=n,
                          thinking_on=True, image_size=(100, 100), **kw)
        r.thinking, r.answer = tools.split_output(text)
        return r

    crop = lambda box, ok: {"name": "Crop", "args": box, "ok": ok, "result": None if ok else "Error: x"}
    gt = {"answer": "green", "bbox": [0, 0, 10, 10]}
    rs = [(roll(good, [crop([0, 0, 10, 10], True), crop([50, 50, 50, 60], False)], "eos", 40), gt),
          (roll("<think>\nhm\n</think>\n\n<answer>red</answer>", [], "length", 100), gt),
          (roll(good.replace("Crop [0, 0, 10, 10]</tool_call><image>", "Identify [1, 1, 9, 9]</tool_call>"
                             "<tool_response>it</tool_response>"),
                [{"name": "Identify", "args": [1, 1, 9, 9], "ok": True, "result": "it"}], "eos", 60),
           {"answer": "green"})]
    stats = [scoring.trajectory_stats(r, s) for r, s in rs]
    assert [s["format"] for s in stats] == [1.0, 1.0, 1.0] and [s["accuracy"] for s in stats] == [1.0, 0.0, 1.0]
    got = scoring.summarize(sum(stats, scoring.Counter()))
    assert got == {"questions": 3, "accuracy": 2 / 3, "format_rate": 1.0, "tool_calls_per_question": 1.0,
                   "tool_rate": 2 / 3, "answer_rate": 1.0,
                   "valid_crop_rate": 0.5, "mean_crop_iou": 0.5, "mean_generated_tokens": 200 / 3,
                   "finish": {"eos": 2, "length": 1}, "tools": {"Crop": 2, "Identify": 1}}
    assert scoring.summarize(scoring.Counter())["valid_crop_rate"] is None  # nothing to measure: None, not 0
