"""Benchmarks evaluated the way their papers do it: V* Bench, HR-Bench 4K / 8K and MME-RealWorld (full and Lite), read
in the layout the Hugging Face Hub publishes them in, prompted and scored as their own evaluation code does, and
summarised with the breakdown the papers report plus the run's tool use; standard library only. infer.py --bench NAME
--data PATH --output runs/x.jsonl: locate() before the model loads, load() -> requests and error records {"id",
"error", "file", "row", "field", "bench"}; a record gets its request's "bench" and "seconds"; summarize(all records of
the output: resume-safe) is printed as table() and written to runs/x.summary.json; --compare: compare(paths).

What is published, and how it is scored (in our words; the files named were read for it):
* V* Bench, hub craigwu/vstar_bench: folders direct_attributes/ (115 questions) and relative_position/ (76), each
  picture `x.jpg` beside `x.json` {"target_object", "bbox": [[x, y, w, h]], "question", "options"}, options[0] the
  right one (penghao-wu/vstar vstar_bench_eval.py scores `chosen == 0`, overall over all 191; counts: inspect_evals'
  V*Bench page). Later the hub added test_questions.jsonl {"question_id", "image": "direct_attributes/x.jpg", "text":
  question, "(A) ..." lines and "Answer with the option's letter from the given choices directly.", "category",
  "label"}, options in a fixed shuffled order (lmms-eval tasks/vstar_bench: letters per category and overall). It is
  read when there, and its form is the prompt; from the folders (as DeepEyes eval/eval_vstar.py, unseeded) the
  options are shuffled seeded by the question's name: a resumed run asks the same.
* HR-Bench, hub DreamMr/HR-Bench: hr_bench_4k.tsv / hr_bench_8k.tsv (and .parquet), 800 rows each: 200 questions (100
  FSP, 100 FCP: the README) x 4 option rotations (`cycle_category`). Columns index, question, answer (a letter),
  category ("single" = FSP, "cross" = FCP: DeepEyes eval/judge_result_hrbench.py), A-D, cycle_category, image (base64,
  the ohjoonhee/HR-Bench mirror's card; or, at most 64 characters, the index of the row whose picture it shares: how
  VLMEvalKit's ImageBaseDataset reads TSVs). Prompt: VLMEvalKit's multiple-choice one, kept by the authors' fork
  (DreamMr/HR-Bench hrbench/vlmeval/dataset/image_mcq.py). Score (HRBenchDataset.evaluate there): accuracy per cycle,
  averaged over cycles, for FSP, FCP and all; their LLM judge is our rule (extract_choice), as lmms-eval's
  hrbench_evals.py tries first. An 8K row holds ~6 MB of base64: load() streams the file and writes each picture once
  to `cache_dir` (default ~/.cache/ovis-tune/bench/<file>-<size>/; infer.py: bench_images/ beside the output).
* MME-RealWorld, hub yifanzhang114/MME-RealWorld: MME_RealWorld.json (a JSON list) + the image archives unpacked
  beside it ("Image" relative to it); Lite (yifanzhang114/MME-RealWorld-Lite): data.zip -> data/MME-RealWorld-Lite.json
  + data/imgs/<file name>. Items {"Question_id", "Image", "Text", "Answer choices": ["(A) ...", ..., "(E) ..."],
  "Ground truth": letter, "Task": Perception | Reasoning, "Subtask" (five domains), "Category"} (yfzhang114/
  MME-RealWorld evaluation/output_test_template.json). Prompt: that repo's README (also lmms-eval tasks/mme_realworld).
  Score (evaluation/eval_your_results.py): accuracy per Task, Task/Subtask, category ("attribute" ones merged), overall.
Answers: the official scripts differ (V*: option likelihood; MME: the first capital A-E; HR-Bench: an LLM judge); one
rule set serves all three (extract_choice), stricter than theirs on ambiguity: two letters or none is `unparsed`,
counted wrong. Error records (an unreadable row, a missing picture, a failed answer) count as `errors` only.
"""

import base64
import binascii
import csv
import json
import os
import random
import re
import string
import sys
from collections import defaultdict
from pathlib import Path

BENCHES = ("vstar", "hrbench4k", "hrbench8k", "mmerw", "mmerw_lite")
TITLES = {"vstar": "V* Bench", "hrbench4k": "HR-Bench 4K", "hrbench8k": "HR-Bench 8K", "mmerw": "MME-RealWorld",
          "mmerw_lite": "MME-RealWorld-Lite"}
LETTERS = string.ascii_uppercase
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

VSTAR_CATEGORIES = {"direct_attributes": "attributes", "relative_position": "spatial"}
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
FILES = {"vstar": ["test_questions.jsonl"], "hrbench4k": ["hr_bench_4k.tsv", "hr_bench_4k.parquet"],
         "hrbench8k": ["hr_bench_8k.tsv", "hr_bench_8k.parquet"],
         "mmerw": ["MME_RealWorld.json", "data/MME_RealWorld.json"],
         "mmerw_lite": ["MME-RealWorld-Lite.json", "data/MME-RealWorld-Lite.json"]}  # in a folder: the first there
HR_CATEGORIES = {"single": "FSP", "cross": "FCP"}
HR_INSTRUCTION = "Please select the correct answer from the options above. \n"  # trailing space: VLMEvalKit's
MME_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
                   "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")
OPTION_LINE = re.compile(r"\(([A-Z])\)\s*(.*\S)", re.DOTALL)  # "(A) rubber"
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is no UTF-8


# ----------------------------------------------------------------------------------------------------------------
# Loading: (requests, error records) from the files as downloaded

class _Bad(ValueError):
    """A row that cannot be asked: `field` names what is wrong with it."""
    def __init__(self, field: str, why: str):
        super().__init__(why)
        self.field = field


def _need(ok, field: str, why: str):
    if not ok:
        raise _Bad(field, why)


def _present(v) -> bool:
    return v is not None and str(v).strip() != ""


def locate(name: str, path) -> Path:
    """The file load() reads (for V* without test_questions.jsonl: the folder), checked openable; cheap, so that
    infer.py says a wrong --data before the model loads. FileNotFoundError or ValueError, naming the path."""
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; one of {', '.join(BENCHES)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist (give the folder or file as downloaded from the Hub)")
    file = path if path.is_file() else next((path / n for n in FILES[name] if (path / n).is_file()), None)
    if file is None and name == "vstar" and any((path / d).is_dir() for d in VSTAR_CATEGORIES):
        return path
    if file is None:
        raise FileNotFoundError(f"{name}: {path} holds none of {', '.join(FILES[name])}"
                                + (f", {'/, '.join(VSTAR_CATEGORIES)}/" if name == "vstar" else ""))
    try:
        open(file, "rb").close()
        if file.suffix == ".parquet":
            _parquet_rows(file)
    except (OSError, ImportError, ValueError) as e:  # (pyarrow's error on a file that is no parquet: a ValueError)
        raise ValueError(f"{name}: cannot read {file} ({e})") from None
    return file


def load(name: str, path, *, image_root=None, cache_dir=None) -> tuple[list[dict], list[dict]]:
    """A benchmark as downloaded from the Hub (its folder, or its question / TSV / parquet file) -> (requests, errors).
    A request: {"id", "image": path, "prompt": the benchmark's prompt, "bench": {"name", "options": {letter: text},
    "answer": letter, category fields}}. An error: a record naming the file, the row (the line an editor shows; 1 for
    a V* annotation file), the id and the field. image_root: where the pictures are, when not beside the questions;
    cache_dir: where HR-Bench's pictures are written."""
    file = locate(name, path)
    if name == "vstar" and file.is_dir():
        rows, parse = _vstar_folder_items(file), _vstar_annotation
    elif name == "vstar":
        rows, parse = _json_items(file, "question_id"), _vstar_question(Path(image_root or file.parent))
    elif name.startswith("hrbench"):
        rows, parse = _hrbench(name, file, cache_dir)
    else:
        rows, parse = _json_items(file, "Question_id"), _mme_item(name, Path(image_root or file.parent))
    return _collect(name, rows, parse)


def _collect(name: str, rows, parse) -> tuple[list, list]:
    """rows: (file, row, id, item); parse(id, item) -> a request, or _Bad, which becomes an error record."""
    requests, errors = [], []
    for file, row, qid, item in rows:
        try:
            if isinstance(item, _Bad):
                raise item
            _need(isinstance(item, dict), "json", f"not an object but {type(item).__name__}")
            requests.append(parse(qid, _utf8(item)))
        except _Bad as e:
            rid = str(qid) if _present(qid) else f"{file}:{row}"
            errors.append({"id": rid, "error": f"{file}:{row} id={qid} field={e.field}: {e}", "file": str(file),
                           "row": row, "field": e.field, "bench": {"name": name}})
    return requests, errors


def _request(name: str, qid, image: Path, prompt: str, options: dict, answer: str, **meta) -> dict:
    return {"id": str(qid), "image": str(image), "prompt": prompt,
            "bench": {"name": name, **meta, "options": options, "answer": answer}}


def _options(pairs: list, field: str) -> dict:
    """[(letter, text)] -> {letter: text}: at least two, lettered A, B, C... in order."""
    options = dict(pairs)
    _need(len(options) >= 2 and list(options) == list(LETTERS[:len(options)]) and all(options.values()), field,
          f"needs at least two options lettered A, B, ... in order, got {list(options) or 'none'}")
    return options


def _answer(value, options: dict, field: str) -> str:
    letter = str(value or "").strip().upper()
    _need(letter in options, field, f"{letter!r} is not one of the options {', '.join(options)}")
    return letter


def _picture(field: str, rel, *places: Path) -> Path:
    """The first of `places` that is a file (the ways a layout may keep the picture named `rel`)."""
    _need(isinstance(rel, str) and rel.strip() != "", field, "no picture named")
    found = next((p for p in places if p.is_file()), None)
    _need(found is not None, field, f"missing image {places[0]}")
    return found


def _json_items(file: Path, id_key: str):
    """(file, line, id, item) of a JSON list or a JSONL file; `line`: where the item starts."""
    return ((file, line, item.get(id_key) if isinstance(item, dict) else None, item) for line, item in _json_rows(file))


def _json_rows(file: Path) -> list:
    """[(line, item)] of a JSON list (items found one by one to know their lines) or JSONL. A JSONL line that is no
    JSON is a _Bad item; in a broken JSON list the rest cannot be read: one _Bad item where it breaks."""
    text = file.read_bytes().decode("utf-8-sig", "surrogateescape")  # a byte that is no UTF-8: its item's error
    if not text.lstrip().startswith("["):
        return [(n, _loads(s)) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos, line, counted, out = text.index("[") + 1, 1, 0, []
    while True:
        pos = gap.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if pos >= len(text) or text[pos] == "]":
            return out
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return out + [(line, _Bad("json", f"invalid JSON ({e.msg}); the rest of the list cannot be read"))]
        out.append((line, item))


def _utf8(item: dict) -> dict:
    """`item` (a row decoded with surrogateescape); _Bad for the first field holding bytes that are no UTF-8."""
    for k, v in item.items():
        for text in v if isinstance(v, list) else [v]:
            if isinstance(text, dict):  # a V* annotation
                _utf8(text)
            elif isinstance(text, str) and (m := NOT_UTF8.search(text)):
                raise _Bad(k, f"not UTF-8 (byte 0x{ord(m.group()) - 0xDC00:02x}); the file must be saved as UTF-8")
    return item


def _loads(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        return _Bad("json", f"invalid JSON ({e.msg})")


# V* Bench ------------------------------------------------------------------------------------------------------

def _vstar_prompt(question: str, options: dict) -> str:
    return "\n".join([question, *(f"({k}) {v}" for k, v in options.items()), VSTAR_INSTRUCTION])


def _vstar_question(root: Path):
    """parse() of a test_questions.jsonl line: its text split into question and options, the prompt rebuilt alike."""
    def parse(qid, row: dict) -> dict:
        _need(_present(qid), "question_id", "missing")
        _need(isinstance(row.get("text"), str), "text", "missing")
        lines = row["text"].strip().splitlines()
        marks = [OPTION_LINE.fullmatch(s.strip()) for s in lines]
        first = next((i for i, m in enumerate(marks) if m), None)
        _need(first is not None, "text", "no options listed on '(A) ...' lines")
        options = _options([m.groups() for m in marks[first:] if m], "text")
        _need(row.get("category") in VSTAR_CATEGORIES, "category",
              f"{row.get('category')!r} is neither {' nor '.join(VSTAR_CATEGORIES)}")
        image = _picture("image", row.get("image"), root / str(row.get("image")))
        return _request("vstar", qid, image, _vstar_prompt("\n".join(lines[:first]).strip(), options), options,
                        _answer(row.get("label"), options, "label"), category=row["category"])
    return parse


def _vstar_folder_items(root: Path):
    """(file, 1, "category/name", {category, annotation, image}) for every picture or annotation in the folders."""
    for sub in [d for d in VSTAR_CATEGORIES if (root / d).is_dir()]:
        files = sorted(p for p in (root / sub).iterdir() if p.is_file())
        pictures = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
        notes = {p.stem: p for p in files if p.suffix == ".json"}
        for stem in sorted(pictures.keys() | notes.keys()):
            note = notes.get(stem)
            annotation = _loads(note.read_bytes().decode("utf-8-sig", "surrogateescape")) if note else \
                _Bad("json", f"no annotation {stem}.json beside the picture")
            item = {"category": sub, "annotation": annotation, "image": pictures.get(stem)}
            yield note or pictures[stem], 1, f"{sub}/{stem}", item


def _vstar_annotation(qid: str, item: dict) -> dict:
    """parse() of a folder annotation: options[0] is the right one; the order shown is shuffled with the id as seed."""
    note = item["annotation"]
    if isinstance(note, _Bad):
        raise note
    _need(isinstance(note, dict) and isinstance(note.get("question"), str), "question", "missing")
    texts = note.get("options")
    _need(isinstance(texts, list) and len(texts) >= 2 and all(isinstance(t, str) and t for t in texts), "options",
          "must be a list of at least two option texts")
    order = list(range(len(texts)))
    random.Random(qid).shuffle(order)  # seeded by a string: the same order on every run and Python version
    options = {LETTERS[i]: texts[j] for i, j in enumerate(order)}
    _need(item["image"] is not None, "image", f"no picture {qid}.* beside {qid}.json")
    return _request("vstar", qid, item["image"], _vstar_prompt(note["question"].strip(), options), options,
                    LETTERS[order.index(0)], category=item["category"])


# HR-Bench -------------------------------------------------------------------------------------------------------

def _hrbench(name: str, file: Path, cache_dir) -> tuple:
    """(rows, parse) of HR-Bench's TSV or parquet; the pictures go to a cache folder named after the file and size. A
    row whose image cell names another row takes its picture; one naming a row not read yet comes after the others."""
    root = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ovis-tune" / "bench")
    cache = root / f"{file.stem}-{file.stat().st_size}"  # another file of the same name gets its own folder
    cache.mkdir(parents=True, exist_ok=True)
    rows = _parquet_rows(file) if file.suffix == ".parquet" else _tsv_rows(file)
    pictures = {}  # index -> its cached picture

    def in_order():
        later = []  # the rows whose picture is another's not read yet: after all the others
        for n, row in rows:
            ref = _reference(row.get("image") if isinstance(row, dict) else None)
            if ref is not None and ref not in pictures:
                later.append((n, row))
            else:
                yield n, row
        yield from later

    def picture(qid, cell) -> Path:
        ref = _reference(cell)
        _need(ref is None or ref in pictures, "image", f"names row index {ref}, which no row has (with a picture)")
        key = str(qid).strip()
        pictures[key] = pictures[ref] if ref else _cache_picture(cell, cache / re.sub(r"[^\w.-]", "_", key))
        return pictures[key]

    def parse(qid, row: dict) -> dict:
        _need(_present(qid), "index", "missing")
        image = picture(qid, row.get("image"))  # first: a row failing below still lends its picture to others
        _need(_present(row.get("question")), "question", "missing")
        options = _options([(k, str(row[k]).strip()) for k in LETTERS if _present(row.get(k))], "A")
        answer = _answer(row.get("answer"), options, "answer")
        category = str(row.get("category") or "").strip()
        _need(category in HR_CATEGORIES, "category", f"{category!r} is neither 'single' (FSP) nor 'cross' (FCP)")
        prompt = "\n".join([f"Question: {str(row['question']).strip()}", "Options:",
                            *(f"{k}. {v}" for k, v in options.items()), HR_INSTRUCTION])
        return _request(name, qid, image, prompt, options, answer, category=category,
                        cycle=str(row.get("cycle_category") or ""))
    return ((file, n, row.get("index") if isinstance(row, dict) else None, row) for n, row in in_order()), parse


def _reference(cell) -> str | None:
    """The index an image cell names instead of holding a picture, else None."""
    return cell.strip() if isinstance(cell, str) and 0 < len(cell.strip()) <= 64 else None  # VLMEvalKit's rule


def _tsv_rows(file: Path):
    """(line, {column: cell}) per row, streamed; a row whose cell count is not the header's is a _Bad item."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # one cell holds a whole picture
    with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:  # a stray byte: its row's error
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, [])
        for cells in filter(None, reader):  # a blank line is no row
            yield reader.line_num, dict(zip(header, cells)) if len(cells) == len(header) else \
                _Bad("row", f"{len(cells)} cells, the header has {len(header)}")


def _parquet_rows(file: Path):
    """(row, {column: value}) per row, a few rows in memory at a time; the file is opened at once (its metadata)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{file}: parquet needs pyarrow (pip install pyarrow); the .tsv beside it does not") from None
    return enumerate((row for batch in pq.ParquetFile(file).iter_batches(batch_size=8) for row in batch.to_pylist()), 1)


def _cache_picture(value, stem: Path) -> Path:
    """A row's picture (base64 text, bytes or a datasets {"bytes"}) written once as its original encoded bytes; a file
    already there with the same size is kept (a resumed run). The suffix is cosmetic: PIL reads the content."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value.strip(), validate=True)
        except binascii.Error as e:
            raise _Bad("image", f"not base64 ({e})") from None
    _need(isinstance(value, bytes) and len(value) > 0, "image", "no picture")
    path = stem.with_suffix(".png" if value.startswith(b"\x89PNG") else ".jpg")
    if not (path.is_file() and path.stat().st_size == len(value)):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(value)
        os.replace(tmp, path)  # never a half-written picture under the final name
    return path


# MME-RealWorld --------------------------------------------------------------------------------------------------

def _mme_item(name: str, root: Path):
    def parse(qid, item: dict) -> dict:
        _need(_present(qid), "Question_id", "missing")
        _need(isinstance(item.get("Text"), str) and item["Text"].strip(), "Text", "missing")
        choices = item.get("Answer choices")
        _need(isinstance(choices, list), "Answer choices", "must be a list of '(A) ...' strings")
        marks = [OPTION_LINE.fullmatch(str(c).strip()) for c in choices]
        _need(all(marks), "Answer choices", "every choice must read '(A) text'")
        options = _options([m.groups() for m in marks], "Answer choices")
        task = str(item.get("Task") or "").strip().capitalize()
        _need(task in ("Perception", "Reasoning"), "Task", f"{item.get('Task')!r} is neither Perception nor Reasoning")
        rel = item.get("Image")
        image = _picture("Image", rel, root / str(rel), root / "imgs" / str(rel), root / "imgs" / Path(str(rel)).name)
        listed = "\n".join(str(c).strip() for c in choices)
        prompt = f"{item['Text']} The choices are listed below:\n{listed}\n{MME_INSTRUCTION}"
        return _request(name, qid, image, prompt, options, _answer(item.get("Ground truth"), options, "Ground truth"),
                        task=task, subtask=str(item.get("Subtask") or ""), category=str(item.get("Category") or ""))
    return parse


# ----------------------------------------------------------------------------------------------------------------
# Answers: the chosen letter

def extract_choice(text: str, options: dict) -> str | None:
    """The option letter an answer names, from inside <answer>...</answer> when present, else the whole text: a lone
    letter in any case ("b", "(C)", "C."), a parenthesised letter, a leading "C. ..." / "C) ...", "answer / option /
    choice (is) C" (lower case only at the end of a clause), or else the text of exactly one option. Only the option
    letters count; two different ones, or none, give None (unparsed)."""
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", text or "", re.DOTALL)
    s = re.sub(r"\\boxed\{([^}]*)\}", r"\1", m.group(1) if m else text or "").replace("*", "").strip().strip("\"'`")
    up = "".join(k for k in options if len(k) == 1 and k in LETTERS)
    if not up:
        return None
    low = up.lower()
    if m := re.fullmatch(rf"\(?([{up}{low}])\)?[.:)]?", s):
        return m.group(1).upper()
    letters = {x.upper() for x in re.findall(rf"\(([{up}{low}])\)", s)}
    letters |= {(a or b).upper() for a, b in re.findall(
        rf"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\(?(?:([{up}])\b|([{low}])(?=\s*$|[.,;:)!]))", s)}
    if m := re.match(rf"([{up}])[.:)](?:\s|$)", s):
        letters.add(m.group(1))
    if letters:
        return letters.pop() if len(letters) == 1 else None
    return _by_text(s, options)


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(s).lower()).split())


def _by_text(s: str, options: dict) -> str | None:
    """The option whose text the answer is, else the one option whose text it contains (whole words), else None."""
    said = _norm(s)
    exact = [k for k, v in options.items() if _norm(v) == said]
    hits = exact or [k for k, v in options.items() if _norm(v) and f" {_norm(v)} " in f" {said} "]
    return hits[0] if len(hits) == 1 else None


def score_record(request: dict, rollout) -> dict:
    """{"choice": letter | None, "correct", "unparsed"} of a rollout (tools.Rollout or an output record: its
    `answer`, else its `text`) against the request's bench answer."""
    said = rollout.get("answer") if isinstance(rollout, dict) else getattr(rollout, "answer", None)
    if said is None:
        said = rollout.get("text") if isinstance(rollout, dict) else getattr(rollout, "text", "")
    choice = extract_choice(said or "", request["bench"]["options"])
    return {"choice": choice, "correct": choice == request["bench"]["answer"], "unparsed": choice is None}


# ----------------------------------------------------------------------------------------------------------------
# Summaries: the papers' breakdown, the run's tool use, tables

def _mean(xs: list):
    return sum(xs) / len(xs) if xs else None


def _micro(groups: dict) -> tuple[dict, dict]:
    """{label: [correct?]} -> (accuracy per label, [correct, total] per label)."""
    return {k: _mean(v) for k, v in groups.items()}, {k: [sum(v), len(v)] for k, v in groups.items()}


def _vstar_breakdown(done: list, correct: list) -> tuple:
    groups = {"attributes": [], "spatial": []}
    for r, c in zip(done, correct):
        groups[VSTAR_CATEGORIES[r["bench"]["category"]]].append(c)
    return (*_micro({**groups, "overall": correct}), {})  # overall: all questions, as SEAL's script


def _hrbench_breakdown(done: list, correct: list) -> tuple:
    """FSP / FCP / overall: the accuracy within each option rotation (cycle_category), averaged over rotations."""
    cycles = defaultdict(lambda: {"FSP": [], "FCP": [], "overall": []})
    for r, c in zip(done, correct):
        cycle = cycles[r["bench"].get("cycle", "")]
        cycle[HR_CATEGORIES[r["bench"]["category"]]].append(c)
        cycle["overall"].append(c)
    accuracy = {k: _mean([_mean(cy[k]) for cy in cycles.values() if cy[k]]) for k in ("FSP", "FCP", "overall")}
    pooled = {k: [x for cy in cycles.values() for x in cy[k]] for k in accuracy}
    return accuracy, _micro(pooled)[1], {}


def _mme_breakdown(done: list, correct: list) -> tuple:
    groups, categories = defaultdict(list), defaultdict(list)
    for r, c in zip(done, correct):
        b = r["bench"]
        for label in ("overall", b["task"].lower(), f"{b['task']}/{b['subtask']}"):
            groups[label].append(c)
        cat = b["category"].lower()
        cat = cat.split("/")[0] + "/attribute" if "attribute" in cat else cat  # merged as the official script does
        categories[f"{b['task']}/{b['subtask']}/{cat}"].append(c)
    order = [k for k in ("overall", "perception", "reasoning") if k in groups] + sorted(k for k in groups if "/" in k)
    accuracy, counts = _micro({k: groups[k] for k in order})
    return accuracy, counts, _micro(dict(sorted(categories.items())))[0]


BREAKDOWNS = {"vstar": _vstar_breakdown, "hrbench4k": _hrbench_breakdown, "hrbench8k": _hrbench_breakdown,
              "mmerw": _mme_breakdown, "mmerw_lite": _mme_breakdown}


def summarize(records: list[dict]) -> dict:
    """Output records of one benchmark run (all of the file; a later record of an id replaces an earlier one) ->
    accuracy per the paper's breakdown (fractions; `counts`: [correct, total]) of the choices score_record reads; tool
    calls per question, valid-crop rate, tokens per answer, seconds per question, unparsed, errors, answered."""
    records = list({str(r["id"]): r for r in records}.values())
    names = {r["bench"]["name"] for r in records if "bench" in r}
    stray = [r["id"] for r in records if "bench" not in r and "error" not in r]
    if len(names) != 1 or stray:
        raise ValueError(f"summarize needs the records of one benchmark run, got benchmarks {sorted(names)}"
                         + (f" and records without `bench` (ids {stray[:3]})" if stray else ""))
    name = names.pop()
    done = [r for r in records if "error" not in r]
    scores = [score_record(r, r) for r in done]
    accuracy, counts, categories = BREAKDOWNS[name](done, [s["correct"] for s in scores])
    crops = [c for r in done for c in r.get("tool_calls") or [] if str(c.get("name", "")).lower() == "crop"]
    return {"bench": name, "answered": len(done), "errors": len(records) - len(done),
            "unparsed": sum(s["unparsed"] for s in scores), "accuracy": accuracy, "counts": counts,
            **({"categories": categories} if categories else {}),
            "tool_calls_per_question": _mean([len(r.get("tool_calls") or []) for r in done]),
            "valid_crop_rate": _mean([bool(c.get("ok")) for c in crops]),
            "tokens_per_answer": _mean([r.get("n_generated") or 0 for r in done]),
            "seconds_per_question": _mean([r["seconds"] for r in done if r.get("seconds") is not None])}


FORMATS = {"pct": (".1f", 100), "x2": (".2f", 1), "x0": (".0f", 1), "n": ("d", 1)}  # format, scale


def _rows(s: dict) -> list[tuple]:
    """(label, value, format) of a summary, in table order."""
    return [(f"{s['bench']} {k}", v, "pct") for k, v in s["accuracy"].items()] + [
        ("tool calls / question", s["tool_calls_per_question"], "x2"), ("valid-crop rate", s["valid_crop_rate"], "pct"),
        ("tokens / answer", s["tokens_per_answer"], "x0"), ("seconds / question", s["seconds_per_question"], "x2"),
        ("unparsed", s["unparsed"], "n"), ("errors", s["errors"], "n"), ("answered", s["answered"], "n")]


def _fmt(v, kind: str, sign: bool = False) -> str:
    if v is None:
        return "–"
    spec, scale = FORMATS[kind]
    x = v * scale
    if isinstance(x, float):
        x = round(x, 9) + 0.0  # a difference that is only a rounding error reads +0.0, never -0.0
    return format(x, ("+" if sign else "") + spec)


def _markdown(names: list[str], summaries: list[dict]) -> str:
    """One column per run, after the first a Δ column: the difference to the first run (points for percentages)."""
    rows = {}  # label -> (format, value per run): the union of all runs' rows, in order of appearance
    for i, s in enumerate(summaries):
        for label, v, kind in _rows(s):
            rows.setdefault(label, (kind, [None] * len(summaries)))[1][i] = v
    head = ["metric", names[0], *(x for n in names[1:] for x in (n, f"Δ {n}"))]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, (kind, vals) in rows.items():
        cells = [label, _fmt(vals[0], kind)]
        for v in vals[1:]:
            cells += [_fmt(v, kind), _fmt(None if v is None or vals[0] is None else v - vals[0], kind, sign=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: dict) -> str:
    """The printed table of one run: its title line, then a markdown table (percentages for accuracies and rates)."""
    return f"{TITLES[summary['bench']]}\n" + _markdown(["value"], [summary])


def compare(paths: list[str]) -> str:
    """Several runs' <output>.summary.json side by side, as one markdown table with differences to the first run.
    Runs are named by their file names without .summary.json (by their paths when two names are the same)."""
    summaries = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    for p, s in zip(paths, summaries):
        if not isinstance(s, dict) or "accuracy" not in s or "bench" not in s:
            raise ValueError(f"{p}: not the summary of an `infer.py --bench` run")
    names = [re.sub(r"(\.summary)?\.json$", "", Path(p).name) for p in paths]
    return _markdown(names if len(set(names)) == len(names) else [str(p) for p in paths], summaries)
