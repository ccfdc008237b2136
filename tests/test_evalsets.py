"""evalsets.py: the published layouts of V* Bench, HR-Bench and MME-RealWorld written here in miniature (tiny PIL
pictures, HR-Bench's base64 TSV), their malformed rows and missing pictures as error records, answer extraction,
the papers' accuracy breakdowns computed by hand, resume, and the --compare table line by line. No model."""

import base64
import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import evalsets
import infer
import report
import tools

INSTR = "Answer with the option's letter from the given choices directly."


def _picture(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _png_b64(size, color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _record(req: dict, answer: str, n: int = 10, seconds: float = 1.0, calls=()) -> dict:
    """An output line as infer.py writes it for a bench request (infer.record + bench + seconds)."""
    return {"id": req["id"], "answer": answer, "thinking": "", "text": f"<answer>{answer}</answer>",
            "tool_calls": list(calls), "n_generated": n, "finish": "eos", "bench": req["bench"], "seconds": seconds}


# ----------------------------------------------------------------------------------------------------------------
# V* Bench: test_questions.jsonl, and the folders of pictures + annotations

VSTAR_ROWS = [  # (question_id, category, question, options, label)
    ("0", "direct_attributes", "What is the material of the glove?", ["rubber", "cotton", "kevlar", "leather"], "B"),
    ("1", "direct_attributes", "What is the color of the dustpan?", ["purple", "red", "blue", "white"], "A"),
    ("2", "direct_attributes", "What is the color of the cup?", ["red", "green", "black", "leather brown"], "D"),
    ("3", "direct_attributes", "What is the color of the bag?", ["pink", "gray", "yellow", "orange"], "C"),
    ("4", "relative_position", "Is the cat on the left or right of the dog?", ["left", "right"], "A"),
    ("5", "relative_position", "Is the cup on the left or right of the lamp?", ["left", "right"], "B"),
]


def _vstar_text(question, options):
    return "\n".join([question] + [f"({'ABCD'[i]}) {o}" for i, o in enumerate(options)] + [INSTR])


@pytest.fixture
def vstar_jsonl(tmp_path):
    root = tmp_path / "vstar_bench"
    lines = []
    for qid, cat, q, opts, label in VSTAR_ROWS:
        _picture(root / cat / f"sa_{qid}.jpg")
        lines.append(json.dumps({"question_id": qid, "image": f"{cat}/sa_{qid}.jpg", "text": _vstar_text(q, opts),
                                 "category": cat, "label": label}))
    lines += ['{"question_id": "6", "image": broken',  # line 7: no JSON
              json.dumps({"question_id": "7", "image": "direct_attributes/sa_7.jpg", "label": "A",  # line 8
                          "text": _vstar_text("Q?", ["x", "y"]), "category": "direct_attributes"}),
              json.dumps({"question_id": "8", "image": "direct_attributes/sa_0.jpg", "label": "E",  # line 9
                          "text": _vstar_text("Q?", ["x", "y"]), "category": "direct_attributes"})]
    (root / "test_questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_vstar_test_questions(vstar_jsonl):
    reqs, errs = evalsets.load("vstar", vstar_jsonl)
    assert [r["id"] for r in reqs] == ["0", "1", "2", "3", "4", "5"]
    r = reqs[0]
    assert r["prompt"] == ("What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n"
                           "Answer with the option's letter from the given choices directly.")
    assert r["image"] == str(vstar_jsonl / "direct_attributes" / "sa_0.jpg")
    assert r["bench"] == {"name": "vstar", "category": "direct_attributes", "answer": "B",
                          "options": {"A": "rubber", "B": "cotton", "C": "kevlar", "D": "leather"}}
    assert reqs[4]["bench"]["options"] == {"A": "left", "B": "right"}
    file = str(vstar_jsonl / "test_questions.jsonl")
    assert [(e["id"], e["file"], e["row"], e["field"]) for e in errs] == [
        (f"{file}:7", file, 7, "json"), ("7", file, 8, "image"), ("8", file, 9, "label")]
    assert errs[1]["error"].startswith(f"{file}:8 id=7 field=image: missing image ")
    assert "'E' is not one of the options A, B" in errs[2]["error"]
    assert evalsets.load("vstar", vstar_jsonl / "test_questions.jsonl") == (reqs, errs)  # the file itself


VSTAR_NOTES = [  # the folder layout: options[0] is the right one
    ("direct_attributes", "sa_1", "What is the color of the hat?", ["red", "blue", "green", "white"]),
    ("direct_attributes", "sa_2", "What is the color of the car?", ["black", "silver", "gold", "teal"]),
    ("relative_position", "sa_3", "Is the cup left or right of the pot?", ["left", "right"]),
]


def test_vstar_folders(tmp_path):
    root = tmp_path / "vstar_bench"
    for sub, stem, q, opts in VSTAR_NOTES:
        _picture(root / sub / f"{stem}.jpg")
        (root / sub / f"{stem}.json").write_text(json.dumps({"target_object": ["x"], "bbox": [[1, 2, 3, 4]],
                                                             "question": q, "options": opts}))
    _picture(root / "direct_attributes" / "sa_4.jpg")  # a picture without its annotation
    (root / "direct_attributes" / "sa_5.json").write_text("{broken")  # an annotation that is no JSON
    (root / "relative_position" / "sa_6.json").write_text(json.dumps({"question": "Q?", "options": ["a", "b"]}))

    reqs, errs = evalsets.load("vstar", root)
    assert [r["id"] for r in reqs] == ["direct_attributes/sa_1", "direct_attributes/sa_2", "relative_position/sa_3"]
    for r, right in zip(reqs, ("red", "black", "left")):  # options[0] of the annotation is the right answer
        b = r["bench"]
        assert b["options"][b["answer"]] == right and sorted(b["options"]) == list("ABCD"[:len(b["options"])])
        assert r["prompt"].splitlines()[1:] == [f"({k}) {v}" for k, v in b["options"].items()] + [INSTR]
    assert reqs[0]["image"] == str(root / "direct_attributes" / "sa_1.jpg")
    assert [(e["id"], e["field"], e["row"]) for e in errs] == [
        ("direct_attributes/sa_4", "json", 1), ("direct_attributes/sa_5", "json", 1),
        ("relative_position/sa_6", "image", 1)]
    assert evalsets.load("vstar", root) == (reqs, errs)  # the shuffle is seeded: a resumed run asks the same
    with pytest.raises(FileNotFoundError, match="holds none of test_questions.jsonl, direct_attributes/"):
        evalsets.load("vstar", tmp_path / "vstar_bench" / "direct_attributes")


# ----------------------------------------------------------------------------------------------------------------
# HR-Bench: the base64 TSV (and the parquet, when pyarrow is there)

HR_HEADER = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
HR_ROWS = [  # index, category, cycle, answer; the picture of row i is (60 + i) x 40
    (0, "single", "c0", "A"), (1, "single", "c0", "B"), (2, "cross", "c0", "C"),
    (3, "single", "c1", "A"), (4, "cross", "c1", "D"), (5, "cross", "c1", "B")]


def _hr_cells(idx, cat, cycle, answer):
    return [str(idx), f'What does the "sign" {idx} say?', answer, cat, "stop", "go", "wait", "yield", cycle,
            _png_b64((60 + idx, 40), (10 * idx, 90, 160))]


@pytest.fixture
def hr_tsv(tmp_path):
    path = tmp_path / "HR-Bench" / "hr_bench_8k.tsv"
    path.parent.mkdir()
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")  # quotes a cell holding '"', as pandas' to_csv does
        w.writerow(HR_HEADER)
        for row in HR_ROWS[:3]:
            w.writerow(_hr_cells(*row))
        f.write("6\tWhat is it?\tA\tsingle\n")  # line 5: a torn row
        w.writerow(_hr_cells(7, "cross", "c0", "B")[:-1] + ["not//base64!" * 8])  # line 6 (too long to name a row)
        w.writerow(_hr_cells(8, "single", "c0", "E"))  # line 7: the answer is no option
        for row in HR_ROWS[3:]:
            w.writerow(_hr_cells(*row))
    return path


def test_hrbench_tsv(hr_tsv, tmp_path):
    cache = tmp_path / "cache"
    reqs, errs = evalsets.load("hrbench8k", hr_tsv.parent, cache_dir=cache)  # the folder as downloaded
    assert [r["id"] for r in reqs] == ["0", "1", "2", "3", "4", "5"]
    r = reqs[0]
    assert r["prompt"] == ('Question: What does the "sign" 0 say?\nOptions:\nA. stop\nB. go\nC. wait\nD. yield\n'
                           "Please select the correct answer from the options above. \n")
    assert r["bench"] == {"name": "hrbench8k", "category": "single", "cycle": "c0", "answer": "A",
                          "options": {"A": "stop", "B": "go", "C": "wait", "D": "yield"}}
    for q, (idx, *_rest) in zip(reqs, HR_ROWS):  # the original bytes, decoded once into the cache folder
        p = Path(q["image"])
        assert p.parent.parent == cache and p.read_bytes() == base64.b64decode(_hr_cells(*HR_ROWS[idx])[-1])
        with Image.open(p) as im:
            assert im.size == (60 + idx, 40)
    file = str(hr_tsv)
    assert [(e["id"], e["file"], e["row"], e["field"]) for e in errs] == [
        (f"{file}:5", file, 5, "row"), ("7", file, 6, "image"), ("8", file, 7, "answer")]
    assert "4 cells, the header has 10" in errs[0]["error"]
    stamps = [Path(q["image"]).stat().st_mtime_ns for q in reqs]
    assert evalsets.load("hrbench8k", hr_tsv, cache_dir=cache) == (reqs, errs)  # the file itself, again
    assert [Path(q["image"]).stat().st_mtime_ns for q in reqs] == stamps  # the cached pictures are not rewritten


def test_hrbench_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [dict(zip(HR_HEADER, _hr_cells(*r))) for r in HR_ROWS[:2]]
    for i, row in enumerate(rows):  # integer ids; pictures in the datasets Image layout
        row.update(index=i, image={"bytes": base64.b64decode(row["image"]), "path": f"{i}.png"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hr_bench_4k.parquet")
    reqs, errs = evalsets.load("hrbench4k", tmp_path, cache_dir=tmp_path / "cache")
    assert [r["id"] for r in reqs] == ["0", "1"] and errs == []
    assert reqs[1]["prompt"].startswith('Question: What does the "sign" 1 say?\nOptions:\nA. stop\n')
    assert Path(reqs[1]["image"]).read_bytes() == rows[1]["image"]["bytes"]
    rows = [dict(zip(HR_HEADER, _hr_cells(*r))) for r in HR_ROWS[:2]]  # base64 text, as the ohjoonhee mirror has it
    rows[0]["image"] = "1"  # a row naming the next one's picture
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hr_bench_4k.parquet")
    reqs, errs = evalsets.load("hrbench4k", tmp_path, cache_dir=tmp_path / "cache")
    assert [r["id"] for r in reqs] == ["1", "0"] and errs == [] and reqs[0]["image"] == reqs[1]["image"]


def test_hrbench_image_cells_naming_another_row(tmp_path):
    """VLMEvalKit's TSV convention (HR-Bench's loader is VLMEvalKit's): an image cell of at most 64 characters is the
    index of the row whose picture it shares. Before or after it in the file; one no row has is this row's error."""
    path = tmp_path / "hr_bench_4k.tsv"
    cells = {i: _hr_cells(i, "single", "c0", "A") for i in (0, 1, 2, 3, 6, 7, 9)}
    cells[6][2] = "E"  # line 6: its answer is no option, but its picture is there for row 7
    for i, ref in ((1, "0"), (2, "9"), (3, "42"), (7, " 6 ")):
        cells[i][-1] = ref  # 2 names a later row, 3 one that is not there
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerows([HR_HEADER] + [cells[i] for i in (0, 1, 2, 3, 6, 7, 9)])
    cache = tmp_path / "cache"
    reqs, errs = evalsets.load("hrbench4k", path, cache_dir=cache)
    assert [r["id"] for r in reqs] == ["0", "1", "7", "9", "2"]  # 2 is asked once row 9 has been read
    image = {r["id"]: Path(r["image"]) for r in reqs}
    assert image["1"] == image["0"] and image["2"] == image["9"] and image["7"].stem == "6"
    assert sorted(p.name for p in image["0"].parent.iterdir()) == ["0.png", "6.png", "9.png"]  # each written once
    assert image["2"].read_bytes() == base64.b64decode(cells[9][-1])
    assert [(e["id"], e["row"], e["field"]) for e in errs] == [("6", 6, "answer"), ("3", 5, "image")]
    assert errs[1]["error"] == f"{path}:5 id=3 field=image: names row index 42, which no row has (with a picture)"
    assert reqs[1]["bench"] == reqs[0]["bench"] and reqs[1]["prompt"] == reqs[0]["prompt"].replace("0 say", "1 say")


def test_bytes_that_are_not_utf8_are_the_error_of_their_row(tmp_path, vstar_jsonl, mme_full):
    """A Latin-1 byte spoils the row or item it is in (an error record naming the file, row and field), never the
    run; a UTF-8 byte-order mark is no part of the first column's name."""
    tsv = tmp_path / "hr" / "hr_bench_8k.tsv"
    tsv.parent.mkdir()
    lines = ["\t".join(HR_HEADER)] + ["\t".join(_hr_cells(*r)).replace('"sign"', "sign") for r in HR_ROWS[:3]]
    raw = ("\n".join(lines) + "\n").encode().replace(b"sign 1 say", b"sign 1 say caf\xe9")
    tsv.write_bytes(b"\xef\xbb\xbf" + raw)  # as Excel saves it
    reqs, errs = evalsets.load("hrbench8k", tsv, cache_dir=tmp_path / "cache")
    assert [r["id"] for r in reqs] == ["0", "2"]
    assert errs[0]["error"] == f"{tsv}:3 id=1 field=question: not UTF-8 (byte 0xe9); the file must be saved as UTF-8"

    mme = mme_full / "MME_RealWorld.json"
    qid = MME_ITEMS[1][0]
    text = mme.read_bytes().replace(f'"Question_id": "{qid}"'.encode(), f'"Question_id": "{qid}", "x": "'.encode()
                                    + b'\xe9"', 1)
    mme.write_bytes(text)
    line = text[:text.index(qid.encode())].count(b"\n")  # the line of the item's opening brace
    reqs, errs = evalsets.load("mmerw", mme_full)
    assert [r["id"] for r in reqs] == [MME_ITEMS[i][0] for i in (0, 2, 3, 4)]
    assert (errs[0]["id"], errs[0]["row"], errs[0]["field"]) == (qid, line, "x") and "byte 0xe9" in errs[0]["error"]

    jsonl = vstar_jsonl / "test_questions.jsonl"
    jsonl.write_bytes(jsonl.read_bytes().replace(b"the glove", b"the gl\xf6ve"))  # line 1
    note = vstar_jsonl / "folders" / "direct_attributes" / "sa_1.json"
    _picture(note.with_suffix(".jpg"))
    note.write_bytes(b'{"question": "Colour of the b\xe9ret?", "options": ["red", "blue"]}')
    reqs, errs = evalsets.load("vstar", jsonl)
    assert [r["id"] for r in reqs] == ["1", "2", "3", "4", "5"]
    assert (errs[0]["id"], errs[0]["row"], errs[0]["field"]) == ("0", 1, "text")
    reqs, errs = evalsets.load("vstar", note.parent.parent)
    assert reqs == [] and [(e["id"], e["field"]) for e in errs] == [("direct_attributes/sa_1", "question")]


def test_locate_names_a_wrong_data_path(tmp_path, mme_full):
    """What infer.py checks before the model loads: the path, the file a folder must hold, a file that cannot be
    read (a parquet that is none: pyarrow's error, or that pyarrow is missing)."""
    with pytest.raises(FileNotFoundError, match="hrbench4k: .*nowhere does not exist"):
        evalsets.locate("hrbench4k", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds none of hr_bench_4k.tsv, hr_bench_4k.parquet"):
        evalsets.locate("hrbench4k", tmp_path)
    (tmp_path / "hr_bench_4k.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match=r"hrbench4k: cannot read .*hr_bench_4k\.parquet"):
        evalsets.locate("hrbench4k", tmp_path)
    assert evalsets.locate("mmerw", mme_full) == mme_full / "MME_RealWorld.json"
    lite = tmp_path / "lite" / "data" / "MME-RealWorld-Lite.json"
    lite.parent.mkdir(parents=True)
    lite.write_text("[]")
    assert evalsets.locate("mmerw_lite", tmp_path / "lite") == lite


# ----------------------------------------------------------------------------------------------------------------
# MME-RealWorld: the JSON list + image folders (full), data/MME-RealWorld-Lite.json + data/imgs/ (Lite)

MME_ITEMS = [  # Question_id, Task, Subtask, Category, image, ground truth
    ("perception/monitoring/vehicle/attribute/color/0001", "Perception", "Monitoring", "Vehicle/attribute/color",
     "monitoring_images/m1.jpg", "A"),
    ("perception/monitoring/vehicle/attribute/orientation/0002", "Perception", "Monitoring",
     "Vehicle/attribute/orientation", "monitoring_images/m2.jpg", "B"),
    ("perception/ocr_cc/book_map_poster/0003", "Perception", "OCR with Complex Context", "book_map_poster",
     "ocr_cc/o1.png", "C"),
    ("reasoning/diagram_and_table/diagram/0004", "Reasoning", "Diagram and Table", "diagram",
     "diagram_and_table/d1.jpg", "D"),
    ("reasoning/diagram_and_table/diagram/0005", "Reasoning", "Diagram and Table", "diagram",
     "diagram_and_table/d2.jpg", "E"),
]
CHOICES = ["(A) 13", "(B) 90", "(C) 77", "(D) 6", "(E) The image does not feature the buses"]


def _mme_item(qid, task, subtask, cat, image, truth, choices=CHOICES):
    return {"Question_id": qid, "Question Type": "Multiple Choice", "Image": image,
            "Text": "What is the number of buses in the image?", "Answer choices": choices, "Ground truth": truth,
            "Task": task, "Subtask": subtask, "Category": cat}


def _mme_line(path: Path, qid: str) -> int:
    """The line of an item's opening brace in the indented JSON list (the line before its Question_id)."""
    return next(i for i, s in enumerate(path.read_text().splitlines(), 1) if f'"Question_id": "{qid}"' in s) - 1


@pytest.fixture
def mme_full(tmp_path):
    root = tmp_path / "MME-RealWorld"
    for *_, image, _truth in MME_ITEMS:
        _picture(root / image)
    items = [_mme_item(*it) for it in MME_ITEMS]
    items.append(_mme_item("perception/monitoring/x/0006", "Perception", "Monitoring", "x", "monitoring_images/no.jpg",
                           "A"))  # its picture is missing
    items.append(_mme_item("perception/monitoring/x/0007", "Perception", "Monitoring", "x", "monitoring_images/m1.jpg",
                           "A", choices=["A) 13", "B) 90"]))  # choices not in the published form
    (root / "MME_RealWorld.json").write_text(json.dumps(items, indent=4))
    return root


def test_mme_realworld_full(mme_full):
    reqs, errs = evalsets.load("mmerw", mme_full)
    assert [r["id"] for r in reqs] == [it[0] for it in MME_ITEMS]
    r = reqs[0]
    assert r["prompt"] == ("What is the number of buses in the image? The choices are listed below:\n(A) 13\n(B) 90\n"
                           "(C) 77\n(D) 6\n(E) The image does not feature the buses\nSelect the best answer to the "
                           "above multiple-choice question based on the image. Respond with only the letter (A, B, C, "
                           "D, or E) of the correct option.\nThe best answer is:")
    assert r["image"] == str(mme_full / "monitoring_images" / "m1.jpg")
    assert r["bench"] == {"name": "mmerw", "task": "Perception", "subtask": "Monitoring",
                          "category": "Vehicle/attribute/color", "answer": "A",
                          "options": {"A": "13", "B": "90", "C": "77", "D": "6",
                                      "E": "The image does not feature the buses"}}
    file = mme_full / "MME_RealWorld.json"
    assert [(e["id"], e["row"], e["field"]) for e in errs] == [
        ("perception/monitoring/x/0006", _mme_line(file, "perception/monitoring/x/0006"), "Image"),
        ("perception/monitoring/x/0007", _mme_line(file, "perception/monitoring/x/0007"), "Answer choices")]
    assert errs[0]["error"].endswith(f"missing image {mme_full / 'monitoring_images' / 'no.jpg'}")


def test_mme_realworld_lite(tmp_path):
    root = tmp_path / "MME-RealWorld-Lite"
    _picture(root / "data" / "imgs" / "TRAIN_BICUBIC_HQ_50K_14456.png")
    item = _mme_item("perception/ocr_cc/book_map_poster/0913", "Perception", "OCR with Complex Context",
                     "book_map_poster", "TRAIN_BICUBIC_HQ_50K_14456.png", "B")
    (root / "data" / "MME-RealWorld-Lite.json").write_text(json.dumps([item], indent=4))
    reqs, errs = evalsets.load("mmerw_lite", root)  # the repo folder, data.zip unpacked in it
    assert errs == [] and reqs[0]["image"] == str(root / "data" / "imgs" / "TRAIN_BICUBIC_HQ_50K_14456.png")
    assert reqs[0]["bench"]["name"] == "mmerw_lite" and reqs[0]["bench"]["answer"] == "B"


def test_load_refuses_unknown():
    with pytest.raises(ValueError, match="unknown benchmark 'mme'; one of vstar, hrbench4k"):
        evalsets.load("mme", ".")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evalsets.load("vstar", "/no/such/folder")


# ----------------------------------------------------------------------------------------------------------------
# Answers

OPTS = {"A": "rubber", "B": "cotton", "C": "kevlar", "D": "leather"}


@pytest.mark.parametrize("text, choice", [
    ("B", "B"), ("c", "C"), ("(C)", "C"), ("(c)", "C"), ("C.", "C"), ("Answer: c", "C"), ("The answer is B.", "B"),
    ("The best answer is: (b)", "B"), ("B. cotton", "B"), ("**D**", "D"), ("\\boxed{A}", "A"), ("option B", "B"),
    ("leather", "D"), ("The glove is made of Leather.", "D"), ("<think>maybe (A)</think>\n<answer>D</answer>", "D"),
    ("<answer> (b) ", "B"),  # the answer block of a row cut by its token budget
    ("(A) or (C)", None), ("A and C", None), ("A, C", None), ("rubber or cotton", None),  # two answers
    ("", None), ("I cannot tell from the picture.", None), ("E", None),  # none; a letter that is no option
    ("the answer is a dog", None),  # an article is no letter
])
def test_extract_choice(text, choice):
    assert evalsets.extract_choice(text, OPTS) == choice


def test_score_record_reads_rollouts_and_records():
    req = {"bench": {"options": OPTS, "answer": "D"}}
    assert evalsets.score_record(req, SimpleNamespace(answer="(d)", text="<answer>(d)</answer>")) == \
        {"choice": "D", "correct": True, "unparsed": False}
    assert evalsets.score_record(req, {"answer": "A", "text": "<answer>A</answer>"}) == \
        {"choice": "A", "correct": False, "unparsed": False}
    assert evalsets.score_record(req, {"text": "<think>x</think><answer>leather</answer>"})["correct"]
    assert evalsets.score_record(req, {"answer": "", "text": "<think>(D) is likely"}) == \
        {"choice": None, "correct": False, "unparsed": True}  # never the letters of an unfinished thought


# ----------------------------------------------------------------------------------------------------------------
# Summaries computed by hand

CROP_OK = {"name": "Crop", "args": [1, 2, 30, 20], "ok": True, "result": None}
CROP_BAD = {"name": "Crop", "args": [5, 5, 1, 1], "ok": False, "result": "Error: x1 >= x2"}
IDENTIFY = {"name": "Identify", "args": [1, 2, 30, 20], "ok": True, "result": "a glove"}


def _vstar_records(reqs):
    """Labels B A D C | A B. Attributes: right, right (lower case), right (option text), wrong; spatial: right,
    unparsed."""
    answers = ["B", "(a)", "leather brown", "A", "A", "I cannot tell"]
    calls = [[CROP_OK, CROP_BAD], [IDENTIFY], [], [], [], []]
    return [_record(q, a, n=10 * (i + 1), seconds=i + 1.0, calls=c)
            for i, (q, a, c) in enumerate(zip(reqs, answers, calls))]


def test_vstar_summary_by_hand(vstar_jsonl):
    reqs, errs = evalsets.load("vstar", vstar_jsonl)
    s = evalsets.summarize(errs + _vstar_records(reqs))
    # attributes 3/4, spatial 1/2, overall 4/6; 3 calls / 6 questions, 1 of 2 crops ok; tokens 10..60 -> 35;
    # seconds 1..6 -> 3.5; the 3 unreadable rows are errors, outside the accuracies
    assert s["accuracy"] == {"attributes": 0.75, "spatial": 0.5, "overall": 4 / 6}
    assert s["counts"] == {"attributes": [3, 4], "spatial": [1, 2], "overall": [4, 6]}
    assert (s["answered"], s["errors"], s["unparsed"]) == (6, 3, 1)
    assert (s["tool_calls_per_question"], s["valid_crop_rate"], s["tokens_per_answer"], s["seconds_per_question"]) \
        == (0.5, 0.5, 35, 3.5)
    assert evalsets.table(s).splitlines() == [
        "V* Bench",
        "| metric | value |",
        "|---|---:|",
        "| vstar attributes | 75.0 |",
        "| vstar spatial | 50.0 |",
        "| vstar overall | 66.7 |",
        "| tool calls / question | 0.50 |",
        "| valid-crop rate | 50.0 |",
        "| tokens / answer | 35 |",
        "| seconds / question | 3.50 |",
        "| unparsed | 1 |",
        "| errors | 3 |",
        "| answered | 6 |"]


def test_hrbench_summary_by_hand(hr_tsv, tmp_path):
    reqs, errs = evalsets.load("hrbench8k", hr_tsv, cache_dir=tmp_path / "cache")
    # rows 0-5 (answers A B C | A D B): right, wrong, right | right, wrong, unparsed
    recs = [_record(q, a) for q, a in zip(reqs, ["A", "C", "(C)", "stop", "A", "no idea"])]
    s = evalsets.summarize(recs + errs)
    # cycle c0: FSP 1/2, FCP 1/1, all 2/3; cycle c1: FSP 1/1, FCP 0/2, all 1/3
    # -> FSP (0.5 + 1) / 2 = 0.75, FCP (1 + 0) / 2 = 0.5, overall (2/3 + 1/3) / 2 = 0.5 (pooled would be 2/3, 1/3)
    assert s["accuracy"] == pytest.approx({"FSP": 0.75, "FCP": 0.5, "overall": 0.5})
    assert s["counts"] == {"FSP": [2, 3], "FCP": [1, 3], "overall": [3, 6]}
    assert (s["answered"], s["errors"], s["unparsed"]) == (6, 3, 1)
    assert s["valid_crop_rate"] is None and s["tool_calls_per_question"] == 0
    assert evalsets.table(s).splitlines()[:6] == [
        "HR-Bench 8K", "| metric | value |", "|---|---:|", "| hrbench8k FSP | 75.0 |", "| hrbench8k FCP | 50.0 |",
        "| hrbench8k overall | 50.0 |"]


def test_mme_summary_by_hand(mme_full):
    reqs, errs = evalsets.load("mmerw", mme_full)
    # truths A B C D E: Monitoring right, wrong ("13" is option A); OCR right; Diagram wrong, right (E's text)
    answers = ["A", "13", "The best answer is: C", "<answer>C</answer>", "The image does not feature the buses"]
    s = evalsets.summarize([_record(q, a) for q, a in zip(reqs, answers)] + errs)
    # overall 3/5, perception 2/3, reasoning 1/2, Monitoring 1/2, OCR 1/1, Diagram and Table 1/2
    assert s["accuracy"] == {"overall": 0.6, "perception": 2 / 3, "reasoning": 0.5, "Perception/Monitoring": 0.5,
                             "Perception/OCR with Complex Context": 1.0, "Reasoning/Diagram and Table": 0.5}
    # the two Vehicle/attribute/* categories are one, as in the official script
    assert s["categories"] == {"Perception/Monitoring/vehicle/attribute": 0.5,
                               "Perception/OCR with Complex Context/book_map_poster": 1.0,
                               "Reasoning/Diagram and Table/diagram": 0.5}
    assert (s["answered"], s["errors"], s["unparsed"]) == (5, 2, 0)


def test_summary_keeps_the_last_record_of_an_id_and_one_benchmark(vstar_jsonl):
    reqs, errs = evalsets.load("vstar", vstar_jsonl)
    recs = _vstar_records(reqs)
    failed = {"id": recs[5]["id"], "error": "RuntimeError: out of memory", "bench": {"name": "vstar"}}
    s = evalsets.summarize([failed] + recs)  # asked again with --retry-errors: the answer replaces the error
    assert (s["answered"], s["errors"]) == (6, 0)
    assert evalsets.summarize(recs[:5] + [failed])["errors"] == 1
    with pytest.raises(ValueError, match="one benchmark run"):
        evalsets.summarize(recs + [{**recs[0], "id": "x", "bench": {**recs[0]["bench"], "name": "mmerw"}}])
    with pytest.raises(ValueError, match="without `bench`"):
        evalsets.summarize(recs + [{"id": "y", "answer": "A"}])


def test_resume_of_an_interrupted_run_gives_the_same_summary(vstar_jsonl, tmp_path):
    """What infer.py does with --bench: error records, then answers batch by batch; killed mid-line, run again."""
    reqs, errs = evalsets.load("vstar", vstar_jsonl)
    recs = _vstar_records(reqs)
    whole = evalsets.summarize(errs + recs)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in errs + recs[:3]) + json.dumps(recs[3])[:25])  # torn
    reqs2, errs2 = evalsets.load("vstar", vstar_jsonl)  # the second run reads the benchmark again
    seen = infer.done_ids(str(out))  # drops the torn line
    with open(out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in errs2 + _vstar_records(reqs2) if r["id"] not in seen)
    lines = out.read_text().splitlines()
    assert len(lines) == len(errs) + len(recs)
    assert evalsets.summarize([json.loads(x) for x in lines]) == whole


# ----------------------------------------------------------------------------------------------------------------
# --compare


def test_compare_line_by_line(vstar_jsonl, tmp_path):
    reqs, errs = evalsets.load("vstar", vstar_jsonl)
    tools_on = evalsets.summarize(errs + _vstar_records(reqs))
    base = {"bench": "vstar", "answered": 6, "errors": 3, "unparsed": 2,  # a run without tools, written by hand
            "accuracy": {"attributes": 0.5, "spatial": 0.5, "overall": 0.5}, "counts": {},
            "tool_calls_per_question": 0.0, "valid_crop_rate": None, "tokens_per_answer": 20.0,
            "seconds_per_question": 1.25}
    (tmp_path / "base.summary.json").write_text(json.dumps(base))
    (tmp_path / "tools.summary.json").write_text(json.dumps(tools_on))
    out = evalsets.compare([str(tmp_path / "base.summary.json"), str(tmp_path / "tools.summary.json")])
    assert out.splitlines() == [
        "| metric | base | tools | Δ tools |",
        "|---|---:|---:|---:|",
        "| vstar attributes | 50.0 | 75.0 | +25.0 |",
        "| vstar spatial | 50.0 | 50.0 | +0.0 |",
        "| vstar overall | 50.0 | 66.7 | +16.7 |",
        "| tool calls / question | 0.00 | 0.50 | +0.50 |",
        "| valid-crop rate | – | 50.0 | – |",
        "| tokens / answer | 20 | 35 | +15 |",
        "| seconds / question | 1.25 | 3.50 | +2.25 |",
        "| unparsed | 2 | 1 | -1 |",
        "| errors | 3 | 3 | +0 |",
        "| answered | 6 | 6 | +0 |"]
    (tmp_path / "score.summary.json").write_text(json.dumps({"questions": 6, "accuracy": 0.5}))  # infer.py --score
    with pytest.raises(ValueError, match="score.summary.json: not the summary of an `infer.py --bench` run"):
        evalsets.compare([str(tmp_path / "base.summary.json"), str(tmp_path / "score.summary.json")])


def test_bench_report_page_shows_the_gold_choice_and_whether_it_was_right(hr_tsv, tmp_path):
    """--bench --report: a bench request keeps its gold letter in `bench` and its records carry no scores; the page
    shows the gold option, the choice read from the answer, and `correct` 1 / 0 (an error record: none of them)."""
    reqs, errs = evalsets.load("hrbench8k", hr_tsv, cache_dir=tmp_path / "cache")
    recs = [_record(q, a) for q, a in zip(reqs, ["A", "C", "(C)", "stop", "A", "no idea"])] + errs
    page = report.write_inference_report(tmp_path / "bench.html", reqs, recs).read_text()
    rows = page.split('<div class="row">')[1:]
    assert len(rows) == 9

    def fact(row: str, key: str) -> str | None:
        found = re.search(rf"<tr><th>{key}</th><td>(.*?)</td></tr>", row)
        return found and found.group(1)

    def correct(row: str) -> str | None:
        found = re.search(r"<table><tr><th>correct</th></tr><tr><td>(.*?)</td></tr></table>", row)
        return found and found.group(1)

    shown = [(fact(r, "gold answer"), fact(r, "choice"), correct(r)) for r in rows]
    assert shown == [("A (stop)", "A (stop)", "1"), ("B (go)", "C (wait)", "0"), ("C (wait)", "C (wait)", "1"),
                     ("A (stop)", "A (stop)", "1"), ("D (yield)", "A (stop)", "0"),
                     ("B (go)", "none (unparsed)", "0")] + [(None, None, None)] * 3
    assert all('class="error"' in r for r in rows[6:])


# ----------------------------------------------------------------------------------------------------------------
# infer.py --bench / --compare / --report, end to end with a real model


def test_bench_cli_end_to_end(tool_ckpt, hr_tsv, tmp_path, capsys):
    """`infer.py --bench hrbench8k --data <the folder as downloaded>`: every readable row answered by the real tool
    loop, the unreadable ones error records (counted, exit 1), the summary and table written; a second run resumes
    (nothing asked again, the same summary); --compare of two runs; --report's page."""
    out = tmp_path / "runs" / "tools.jsonl"
    out.parent.mkdir()
    args = ["--model", tool_ckpt, "--bench", "hrbench8k", "--data", str(hr_tsv.parent), "--output", str(out),
            "--tools", "--enable-thinking", "--greedy", "--max-new-tokens", "40", "--single-image-min-pixels", "4096",
            "--single-image-max-pixels", "8192", "--crop-min-pixels", "4096", "--crop-max-pixels", "8192",
            "--report"]
    assert infer.main(args) == 1  # 3 rows could not be read
    said = capsys.readouterr().out
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    answered = [r for r in recs if "error" not in r]
    assert len(answered) == 6 and len(recs) == 9 and all(r["bench"]["name"] == "hrbench8k" for r in recs)
    assert all(r["tool_calls"] and r["seconds"] > 0 for r in answered)  # the model crops on every picture
    summary = json.loads((tmp_path / "runs" / "tools.summary.json").read_text())
    assert summary == evalsets.summarize(recs) and summary["answered"] == 6 and summary["errors"] == 3
    assert evalsets.table(summary) in said and "6 answered, 3 errors" in said
    assert (tmp_path / "runs" / "tools.html").exists() and (tmp_path / "runs" / "bench_images").is_dir()
    assert infer.main(args) == 1 and "0 answered, 0 errors, 9 already in" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "tools.summary.json").read_text()) == summary
    plain = tmp_path / "runs" / "plain.jsonl"  # tools off: a second run to compare with
    plain_args = [str(plain) if a == str(out) else a for a in args if a != "--tools"]
    assert infer.main(plain_args) == 1
    capsys.readouterr()
    assert infer.main(["--compare", str(tmp_path / "runs" / "plain.summary.json"),
                       str(tmp_path / "runs" / "tools.summary.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| metric | plain | tools | Δ tools |" and any(x.startswith("| HR-Bench 8K") or
                                                                        "FSP" in x for x in table)


CLI = ["--tools", "--enable-thinking", "--greedy", "--max-new-tokens", "40", "--single-image-min-pixels", "4096",
       "--single-image-max-pixels", "8192", "--crop-min-pixels", "4096", "--crop-max-pixels", "8192"]


class Killed(BaseException):
    """The run killed from outside (a BaseException: nothing in infer.py catches it)."""


def test_bench_cli_resumes_an_interrupted_run(tool_ckpt, hr_tsv, tmp_path, monkeypatch, capsys):
    """A --bench run killed while its second batch is answered (the first batch on disk, then a torn line), run
    again: it asks only what is missing, and its records and summary are the uninterrupted run's (but the seconds)."""
    def run(out):
        return ["--model", tool_ckpt, "--bench", "hrbench8k", "--data", str(hr_tsv), "--output", str(out),
                "--batch-size", "2", *CLI]

    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    assert infer.main(run(whole)) == 1  # 3 rows cannot be read
    real, batches = infer.answer, []

    def dying(*args, **kw):
        batches.append(1)
        if len(batches) == 2:
            raise Killed
        return real(*args, **kw)

    monkeypatch.setattr(infer, "answer", dying)
    with pytest.raises(Killed):
        infer.main(run(cut))
    lines = cut.read_text().splitlines()
    assert len(lines) == 3 + 2 and not (tmp_path / "cut.summary.json").exists()  # the errors, the first batch
    with open(cut, "a") as f:
        f.write(whole.read_text().splitlines()[5][:40])  # killed while writing a record
    monkeypatch.setattr(infer, "answer", real)
    capsys.readouterr()
    assert infer.main(run(cut)) == 1
    assert "4 answered, 0 errors, 5 already in" in capsys.readouterr().out  # the first batch, the 3 unreadable rows
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    recs = {name: sorted((drop(json.loads(x)) for x in p.read_text().splitlines()), key=lambda r: r["id"])
            for name, p in (("whole", whole), ("cut", cut))}
    assert recs["cut"] == recs["whole"] and len(recs["cut"]) == 9
    summaries = [json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("whole", "cut")]
    for s in summaries:
        assert s.pop("seconds_per_question") > 0
    assert summaries[0] == summaries[1] and summaries[0]["answered"] == 6


def test_bench_cli_says_a_wrong_data_path_before_the_model_loads(tool_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(infer, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for data, why in ((tmp_path / "HR-Bench", "does not exist"), (tmp_path, "holds none of hr_bench_8k.tsv")):
        with pytest.raises(SystemExit) as e:
            infer.main(["--model", tool_ckpt, "--bench", "hrbench8k", "--data", str(data), "--output",
                        str(tmp_path / "out.jsonl")])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_bench_large_picture_decoded_once_and_cropped_at_full_resolution(tool_ckpt, tmp_path, monkeypatch):
    """An HR-Bench 8K-size picture (7680 x 4320) through --bench: decoded once, the first pass sees it resized to
    the budget, and the Crop cuts the full-resolution original (its pixels, not the resized copy's: the picture is a
    fine gradient that no downscaled copy keeps). The tiny model learned one conversation: it crops when asked that
    question, so the request keeps its picture and takes the question."""
    w, h = 7680, 4320
    px = np.empty((h, w, 3), np.uint8)
    px[..., 0], px[..., 1], px[..., 2] = np.arange(w) % 256, (np.arange(h) % 256)[:, None], 90
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG", compress_level=1)
    tsv = tmp_path / "HR-Bench" / "hr_bench_8k.tsv"
    tsv.parent.mkdir()
    tsv.write_text("\t".join(HR_HEADER) + "\n" + "\t".join(_hr_cells(0, "single", "c0", "A")[:-1]
                                                              + [base64.b64encode(buf.getvalue()).decode()]) + "\n")
    opened, cuts, firsts = [], [], []
    real_open, real_run, real_pre, real_load = Image.open, tools.Crop.run, infer.ovis.preprocess_image, evalsets.load
    asked = json.loads((Path(__file__).parent.parent / "data" / "demo" / "grpo.json").read_text())[0]
    question = asked["conversations"][-1]["value"].removeprefix("<image>\n")

    def demo_question(*a, **k):
        reqs, errs = real_load(*a, **k)
        return [{**r, "prompt": question} for r in reqs], errs

    def spy_open(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    def spy_run(self, args, images, keys):
        out = real_run(self, args, images, keys)
        cuts.append((images[0].size, tools.crop_box(args, images[0].size, self.bbox_format, self.min_side), out))
        return out

    def spy_pre(image, *a, **k):
        firsts.append(image.size)
        return real_pre(image, *a, **k)

    monkeypatch.setattr(Image, "open", spy_open)
    monkeypatch.setattr(tools.Crop, "run", spy_run)
    monkeypatch.setattr(infer.ovis, "preprocess_image", spy_pre)
    monkeypatch.setattr(evalsets, "load", demo_question)
    out = tmp_path / "big.jsonl"
    assert infer.main(["--model", tool_ckpt, "--bench", "hrbench8k", "--data", str(tsv.parent), "--output", str(out),
                       *CLI]) == 0
    monkeypatch.setattr(Image, "open", real_open)
    cached = tmp_path / "bench_images" / f"hr_bench_8k-{tsv.stat().st_size}" / "0.png"
    assert opened == [str(cached)]  # decoded once, for the first pass and every crop
    assert firsts[0] == (w, h)  # the first pass resizes the original itself (to <= 8192 px here)
    rec = json.loads(out.read_text())
    assert [c["name"] for c in rec["tool_calls"] if c["ok"]] == ["Crop"] and len(cuts) == 1
    for size, box, result in cuts:
        assert size == (w, h) and result.image.size == (box[2] - box[0], box[3] - box[1])
        assert np.array_equal(np.asarray(result.image), px[box[1]:box[3], box[0]:box[2]])
