"""The user study of the paper (Table II): build anonymised ranking questionnaires, score answers.

The paper (Sec. 4.3, "User study") picks 20 test cases at random, edits each with every method
and asks people to rank the edited images ("the lower the better") from three perspectives:

- **Consistency** (Con.): whether the manipulated image is consistent with the text description;
- **Preservation** (Pre.): whether the manipulated image preserves the text-irrelevant regions;
- **Fidelity** (Fid.): whether the manipulated image is indistinguishable from real pictures.

Table II reports the mean rank of each method per perspective. Here:

`make_study(...)` writes, atomically (a temp folder renamed into place), a folder with

- `index.html`: one self-contained page (no network) showing, per case, the input image, the
  target text and the methods' outputs in a seeded random order per case, labelled A, B, C, ...;
  one ranking question per perspective; a button that downloads the answers as a CSV in the
  layout of the template below;
- `images/`: every image re-encoded as a metadata-free PNG named `<case>_input.png` /
  `<case>_<label>.png` (case ids are `case01`, `case02`, ... in questionnaire order), so neither
  the method nor the original file name can be read off a file;
- `responses_template.csv`: `respondent, case, question, A, B, ...` (rank 1 = best), one blank
  row per case and question;
- `key.json`: case -> label -> method (and case -> original file); the page never refers to it.
  Do not send it to respondents: share `index.html` and `images/` only.

`score_responses(...)` reads filled-in CSVs back, checks each row (ranks a permutation of 1..M,
a known case and question, no missing column) and gives per method and question the mean rank,
the number of answers and the standard error of the mean (sample s.d. / sqrt(n); answers of one
respondent are treated as independent, so this is a rough error bar).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semani.utils.atomic import atomic_dir, write_csv, write_text
from semani.utils.image_io import read_image
from semani.utils.pylogger import get_pylogger

__all__ = [
    "QUESTIONS",
    "InvalidResponseError",
    "MethodScore",
    "UserStudyError",
    "load_key",
    "main",
    "load_texts",
    "make_study",
    "markdown_table",
    "read_responses",
    "score_responses",
    "write_scores_csv",
]

log = get_pylogger(__name__)

# id -> (name, the paper's definition, the ranking prompt shown to respondents)
QUESTIONS: dict[str, tuple[str, str, str]] = {
    "consistency": (
        "Consistency",
        "whether the manipulated image is consistent with the text description",
        "Rank the manipulated images by how consistent they are with the text description.",
    ),
    "preservation": (
        "Preservation",
        "whether the manipulated image preserves the text-irrelevant regions",
        "Rank the manipulated images by how well they preserve the parts of the input image "
        "that the text does not mention.",
    ),
    "fidelity": (
        "Fidelity",
        "whether the manipulated image is indistinguishable from real pictures",
        "Rank the manipulated images by how indistinguishable they are from real pictures.",
    ),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FIXED_COLUMNS = ("respondent", "case", "question")


class UserStudyError(ValueError):
    """Bad inputs to `make_study` / `score_responses` (the message says what and where)."""


class InvalidResponseError(UserStudyError):
    """One row of a responses CSV is invalid; `row` is its spreadsheet row (header = 1)."""

    def __init__(self, row: int, problem: str, path: str | os.PathLike | None = None) -> None:
        self.row, self.problem = row, problem
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}row {row}: {problem}")


# -- making questionnaires ------------------------------------------------------------------------
def _images_by_stem(folder: Path, what: str) -> dict[str, Path]:
    """stem -> image file of `folder` (an error for a missing folder or two files of one stem)."""
    if not folder.is_dir():
        raise UserStudyError(f"{what}: '{folder}' is not a folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in out:
                raise UserStudyError(f"{what}: '{out[p.stem].name}' and '{p.name}' share a name")
            out[p.stem] = p
    return out


def load_texts(path: str | os.PathLike) -> dict[str, str]:
    """Case file name (or stem) -> target text, from a JSON object or a two-column CSV
    (`file,text`; a first row `file,text` / `name,text` / `case,text` is taken as a header)."""
    path = Path(path)
    if not path.is_file():
        raise UserStudyError(f"texts: no such file '{path}'")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise UserStudyError(f"texts: '{path}' is not valid JSON: {err}") from err
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise UserStudyError(f"texts: '{path}' must hold one JSON object {{file: text}}")
        return {str(k): v for k, v in data.items()}
    texts: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if not any(c.strip() for c in row):
                continue
            if i == 1 and [c.strip().lower() for c in row[:2]] in (
                ["file", "text"], ["name", "text"], ["case", "text"]
            ):  # fmt: skip
                continue
            if len(row) != 2:
                raise UserStudyError(f"texts: '{path}' row {i}: expected 2 columns (file, text)")
            texts[row[0].strip()] = row[1].strip()
    return texts


def _text_for(texts: Mapping[str, str], *files: Path) -> str | None:
    """The text of a case keyed by any of its files' names, or by their stem."""
    for k in [*(f.name for f in files), files[0].stem]:
        if k in texts:
            return texts[k]
    return None


def _save_png(src: Path, dst: Path) -> None:
    """`src` re-encoded as an RGB PNG without metadata (no text chunks, EXIF or ICC profile)."""
    Image.fromarray(np.asarray(read_image(src))).save(dst, format="PNG")


def _labels(m: int) -> list[str]:
    if not 1 <= m <= 26:
        raise UserStudyError(f"need 1 to 26 methods (labels A-Z), got {m}")
    return [chr(ord("A") + i) for i in range(m)]


def make_study(
    methods: Mapping[str, str | os.PathLike],
    inputs: str | os.PathLike,
    texts: str | os.PathLike | Mapping[str, str],
    out: str | os.PathLike,
    cases: int | None = None,
    seed: int = 0,
    questions: Sequence[str] = tuple(QUESTIONS),
    overwrite: bool = False,
) -> Path:
    """Write a questionnaire folder (module doc) for `methods` (name -> folder of edited images,
    one per case, matched to `inputs` and `texts` by file name or stem); `cases` picks that many
    cases at random (all by default); `seed` fixes the choice and every per-case order."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{out}' exists: pick another --out or pass --overwrite")
    questions = list(questions)
    unknown = [q for q in questions if q not in QUESTIONS]
    if not questions or unknown or len(set(questions)) != len(questions):
        raise UserStudyError(
            f"questions must be distinct ones of {list(QUESTIONS)}, got {questions}"
        )
    names = list(methods)
    labels = _labels(len(names))
    if any(not n.strip() for n in names):
        raise UserStudyError("a method name is empty")
    if isinstance(texts, Mapping):
        text_map = dict(texts)
    else:
        text_map = load_texts(texts)

    files = {n: _images_by_stem(Path(methods[n]), f"method '{n}'") for n in names}
    input_files = _images_by_stem(Path(inputs), "inputs")
    all_stems = set().union(*(set(f) for f in files.values()))
    common = sorted(
        s for s in all_stems
        if all(s in f for f in files.values()) and s in input_files
        and _text_for(text_map, files[names[0]][s], input_files[s]) is not None
    )  # fmt: skip
    if len(common) < len(all_stems):
        dropped = sorted(all_stems - set(common))
        log.warning(
            "%d case(s) lack an output of some method, an input image or a text and are left "
            "out: %s%s", len(dropped), ", ".join(dropped[:5]), " ..." if len(dropped) > 5 else ""
        )  # fmt: skip
    if not common:
        raise UserStudyError("no case has an output of every method, an input image and a text")
    n_cases = len(common) if cases is None else cases
    if not 1 <= n_cases <= len(common):
        raise UserStudyError(f"--cases {cases}: only {len(common)} complete case(s)")

    rng = random.Random(seed)
    chosen = rng.sample(common, n_cases)  # a random choice, in a random order
    width = max(2, len(str(n_cases)))
    plan = []  # (case id, stem, text, {label: method})
    for i, stem in enumerate(chosen, start=1):
        order = rng.sample(names, len(names))
        text = _text_for(text_map, files[names[0]][stem], input_files[stem])
        plan.append((f"case{i:0{width}d}", stem, text, dict(zip(labels, order))))

    with atomic_dir(out) as tmp:  # a crash leaves no half questionnaire
        (tmp / "images").mkdir()
        for case, stem, _, options in plan:
            _save_png(input_files[stem], tmp / "images" / f"{case}_input.png")
            for label, method in options.items():
                _save_png(files[method][stem], tmp / "images" / f"{case}_{label}.png")
        page = _html([(c, t, list(o)) for c, _, t, o in plan], questions)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        with (tmp / "responses_template.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*FIXED_COLUMNS, *labels])
            for case, *_ in plan:
                for q in questions:
                    w.writerow(["", case, q, *([""] * len(labels))])
        key = {
            "seed": seed,
            "methods": names,
            "questions": questions,
            "cases": {c: o for c, _, _, o in plan},
            "files": {c: files[names[0]][s].name for c, s, _, _ in plan},
        }
        (tmp / "key.json").write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
    log.info(
        "wrote a questionnaire of %d case(s) x %d method(s) x %d question(s) to %s "
        "(share index.html and images/, keep key.json)",
        n_cases, len(names), len(questions), out,
    )  # fmt: skip
    return out


_CSS = """body{font-family:sans-serif;max-width:70em;margin:auto;padding:1em}
.case{border-top:2px solid #888;margin-top:2em;padding-top:1em}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;text-align:center}figure img{width:14em;height:auto;display:block}
.text{font-size:1.2em;background:#eef;padding:.4em .8em}
.q{margin:.8em 0}.q select{margin-right:1em}.bad{color:#b00}"""

_JS = """function go(){
const Q=%s, L=%s, C=%s; const rows=[['respondent','case','question'].concat(L)];
const who=document.getElementById('who').value.trim(); let bad=0;
for(const c of C){for(const q of Q){const r=L.map(l=>document.getElementById(c+'-'+q+'-'+l).value);
const ok=r.every(v=>v!=='')&&new Set(r).size===L.length;
document.getElementById(c+'-'+q).className=ok?'q':'q bad'; if(!ok)bad++;
rows.push([who,c,q].concat(r));}}
if(bad){alert(bad+' question(s) need a distinct rank for every image (1 = best).');return;}
const csv=rows.map(r=>r.map(v=>'"'+String(v).replace(/"/g,'""')+'"').join(',')).join('\\n')+'\\n';
const a=document.createElement('a');a.href=URL.createObjectURL(new Blob([csv],{type:'text/csv'}));
a.download='responses.csv';document.body.appendChild(a);a.click();a.remove();}"""


def _html(plan: Sequence[tuple[str, str, list[str]]], questions: Sequence[str]) -> str:
    """The questionnaire page: (case id, text, labels) per case; nothing names a method or file."""
    labels = plan[0][2]
    e = html.escape
    parts = [
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
        "<title>Image manipulation user study</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Image manipulation user study</h1>",
        "<p>Each case shows an input image, a text describing the wanted change and "
        f"{len(labels)} manipulated images (A, B, ...). For each question give every image a "
        "different rank: <b>1 = best</b>, the lower the better.</p><ul>",
        *(f"<li><b>{QUESTIONS[q][0]}</b>: {QUESTIONS[q][1]}.</li>" for q in questions),
        "</ul><p><label>Your name or id: <input id='who'></label></p>",
    ]
    for n, (case, text, case_labels) in enumerate(plan, start=1):
        parts += [
            f"<div class='case' id='{case}'><h2>Case {n} of {len(plan)}</h2>",
            f"<p class='text'>{e(text)}</p><div class='row'>",
            f"<figure><img src='images/{case}_input.png' alt='input'>"
            "<figcaption>Input</figcaption></figure>",
            *(
                f"<figure><img src='images/{case}_{lab}.png' alt='{lab}'>"
                f"<figcaption><b>{lab}</b></figcaption></figure>"
                for lab in case_labels
            ),
            "</div>",
        ]
        options = "".join(f"<option>{r}</option>" for r in range(1, len(case_labels) + 1))
        for q in questions:
            selects = "".join(
                f"<label>{lab}: <select id='{case}-{q}-{lab}'><option value=''>-</option>"
                f"{options}</select></label>"
                for lab in case_labels
            )
            parts.append(
                f"<div class='q' id='{case}-{q}'><b>{QUESTIONS[q][0]}.</b> {e(QUESTIONS[q][2])}"
                f" (1 = best)<br>{selects}</div>"
            )
        parts.append("</div>")
    js = _JS % (json.dumps(list(questions)), json.dumps(labels), json.dumps([c for c, *_ in plan]))
    parts += [
        "<p><button onclick='go()'>Download my answers (CSV)</button></p>",
        f"<script>{js}</script></body></html>\n",
    ]
    return "\n".join(parts)


# -- scoring --------------------------------------------------------------------------------------
def load_key(path: str | os.PathLike) -> dict:
    """A `key.json` written by `make_study`, checked (every case maps the same labels to a
    permutation of the methods)."""
    try:
        key = json.loads(Path(path).read_text(encoding="utf-8"))
        methods, questions, cases = key["methods"], key["questions"], key["cases"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserStudyError(f"key: cannot read '{path}': {err}") from err
    labels = _labels(len(methods))
    for case, options in cases.items():
        if sorted(options) != labels or sorted(options.values()) != sorted(methods):
            raise UserStudyError(f"key '{path}': case '{case}' does not map {labels} to methods")
    if not set(questions) <= set(QUESTIONS):
        raise UserStudyError(f"key '{path}': unknown question(s) in {questions}")
    return key


def _rank(value: str, m: int) -> int | None:
    """A rank cell -> int in 1..m ('2' and '2.0' both work), else None."""
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if f.is_integer() and 1 <= f <= m else None


def read_responses(
    path: str | os.PathLike, key: Mapping, skip_invalid: bool = False
) -> tuple[list[tuple[str, str, dict[str, int]]], int]:
    """The valid answers of a responses CSV as (case, question, {method: rank}) and the number
    of invalid rows dropped (only with `skip_invalid`; else the first raises
    `InvalidResponseError`). Fully blank rows are ignored."""
    labels = _labels(len(key["methods"]))
    answers: list[tuple[str, str, dict[str, int]]] = []
    seen: dict[tuple[str, str, str], int] = {}
    dropped = 0
    with Path(path).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in (*FIXED_COLUMNS, *labels) if c not in header]
        if missing:
            raise InvalidResponseError(1, f"missing column(s) {', '.join(missing)}", path)
        col = {c: header.index(c) for c in (*FIXED_COLUMNS, *labels)}
        for row_no, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):
                continue
            try:
                answers.append(_check_row(cells, col, key, labels, seen, row_no))
            except InvalidResponseError as err:
                if not skip_invalid:
                    raise InvalidResponseError(row_no, err.problem, path) from None
                log.warning("%s: dropped row %d: %s", path, row_no, err.problem)
                dropped += 1
    return answers, dropped


def _check_row(
    cells: list[str],
    col: Mapping[str, int],
    key: Mapping,
    labels: list[str],
    seen: dict[tuple[str, str, str], int],
    row_no: int,
) -> tuple[str, str, dict[str, int]]:
    def cell(name: str) -> str:
        i = col[name]
        return cells[i].strip() if i < len(cells) else ""

    case, question = cell("case"), cell("question").lower()
    if case not in key["cases"]:
        raise InvalidResponseError(row_no, f"unknown case '{case}'")
    if question not in key["questions"]:
        raise InvalidResponseError(
            row_no, f"unknown question '{cell('question')}' (expected one of {key['questions']})"
        )
    empty = [lab for lab in labels if not cell(lab)]
    if empty:
        raise InvalidResponseError(row_no, f"missing rank in column(s) {', '.join(empty)}")
    ranks = {lab: _rank(cell(lab), len(labels)) for lab in labels}
    bad = [f"{lab}={cell(lab)}" for lab, r in ranks.items() if r is None]
    if bad:
        raise InvalidResponseError(
            row_no, f"rank(s) outside 1..{len(labels)}: {', '.join(bad)}"
        )  # fmt: skip
    if len(set(ranks.values())) != len(labels):
        raise InvalidResponseError(
            row_no, "repeated rank(s): " + ", ".join(f"{lab}={r}" for lab, r in ranks.items())
        )
    who = cell("respondent")
    if who:
        first = seen.setdefault((who, case, question), row_no)
        if first != row_no:
            raise InvalidResponseError(
                row_no, f"'{who}' already answered {case} / {question} in row {first}"
            )
    options = key["cases"][case]
    return case, question, {options[lab]: r for lab, r in ranks.items()}


@dataclass(frozen=True)
class MethodScore:
    """One method's mean rank on one question (1 = best), over `n` answers."""

    method: str
    question: str
    mean_rank: float
    n: int
    se: float  # standard error of the mean; nan for n < 2


def score_responses(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    key: Mapping | str | os.PathLike,
    skip_invalid: bool = False,
) -> tuple[list[MethodScore], int]:
    """Mean rank per method and question over the answers of one or more responses CSVs
    (methods and questions in the key's order), and the number of invalid rows dropped."""
    key = load_key(key) if not isinstance(key, Mapping) else key
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    ranks: dict[tuple[str, str], list[int]] = {
        (m, q): [] for m in key["methods"] for q in key["questions"]
    }
    dropped = 0
    for p in paths:
        answers, d = read_responses(p, key, skip_invalid)
        dropped += d
        for _, question, by_method in answers:
            for method, r in by_method.items():
                ranks[(method, question)].append(r)
    scores = []
    for (method, question), rs in ranks.items():
        n = len(rs)
        mean = statistics.fmean(rs) if n else math.nan
        se = statistics.stdev(rs) / math.sqrt(n) if n >= 2 else math.nan
        scores.append(MethodScore(method, question, mean, n, se))
    return scores, dropped


def markdown_table(scores: Sequence[MethodScore], digits: int = 2) -> str:
    """Table II's layout: a row per method, a column per question, `mean ± s.e.`, then a note
    with the number of answers per question."""
    methods = list(dict.fromkeys(s.method for s in scores))
    questions = list(dict.fromkeys(s.question for s in scores))
    by = {(s.method, s.question): s for s in scores}

    def fmt(s: MethodScore) -> str:
        if math.isnan(s.mean_rank):
            return "-"
        se = "" if math.isnan(s.se) else f" ± {s.se:.{digits}f}"
        return f"{s.mean_rank:.{digits}f}{se}"

    cols = ["Method", *(f"{QUESTIONS[q][0]} (↓)" for q in questions)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([m, *(fmt(by[m, q]) for q in questions)]) + " |" for m in methods]
    counts = ", ".join(f"{QUESTIONS[q][0].lower()} {by[methods[0], q].n}" for q in questions)
    lines += [
        "",
        f"Mean rank (1 = best; ± standard error of the mean) over n answers: {counts}.",
    ]
    return "\n".join(lines) + "\n"


def write_scores_csv(scores: Sequence[MethodScore], path: str | os.PathLike) -> None:
    """One row per method and question: method, question, mean_rank, n, se (written
    atomically)."""
    rows = [
        {"method": s.method, "question": s.question, "mean_rank": f"{s.mean_rank:.6g}",
         "n": s.n, "se": f"{s.se:.6g}"}
        for s in scores
    ]  # fmt: skip
    write_csv(path, rows, ("method", "question", "mean_rank", "n", "se"))


# -- command line ---------------------------------------------------------------------------------
def _method_arg(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    if not sep or not name.strip() or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{value}'")
    return name.strip(), folder


def main(argv: Sequence[str] | None = None) -> int:
    """CLI of ``scripts/user_study.py`` (``make`` / ``score``); returns the exit status."""
    p = argparse.ArgumentParser(description="The user study of Table II: questionnaires, scores.")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="build an anonymised ranking questionnaire")
    mk.add_argument("--methods", type=_method_arg, nargs="+", required=True, metavar="NAME=DIR")
    mk.add_argument("--inputs", type=Path, required=True, help="folder of the input images")
    mk.add_argument("--texts", type=Path, required=True, help="CSV or JSON: file name -> text")
    mk.add_argument("--out", type=Path, required=True, help="new folder for the questionnaire")
    mk.add_argument("--cases", type=int, default=None, help="pick N cases at random (all)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--questions", default=",".join(QUESTIONS), help="comma-separated")
    mk.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sc = sub.add_parser("score", help="mean rank per method and question")
    sc.add_argument("responses", type=Path, nargs="+", help="filled-in responses CSV(s)")
    sc.add_argument("--key", type=Path, required=True, help="the questionnaire's key.json")
    sc.add_argument("--out", type=Path, default=None, help="also write a .md or .csv table")
    sc.add_argument("--skip-invalid", action="store_true", help="drop invalid rows, count them")
    args = p.parse_args(argv)
    try:
        if args.command == "make":
            methods = dict(args.methods)
            if len(methods) != len(args.methods):
                raise UserStudyError("two --methods share a name")
            make_study(
                methods, args.inputs, args.texts, args.out, args.cases, args.seed,
                [q.strip() for q in args.questions.split(",") if q.strip()], args.overwrite,
            )  # fmt: skip
            return 0
        if args.out is not None and args.out.suffix.lower() not in (".md", ".csv"):
            raise UserStudyError(f"--out '{args.out}': use a .md or .csv file")
        scores, dropped = score_responses(args.responses, args.key, args.skip_invalid)
        if dropped:
            log.warning("dropped %d invalid row(s) (--skip-invalid)", dropped)
        table = markdown_table(scores)
        sys.stdout.write(table)
        if args.out is not None and args.out.suffix.lower() == ".csv":
            write_scores_csv(scores, args.out)
        elif args.out is not None:
            write_text(args.out, table)
        return 0
    except (UserStudyError, OSError) as err:
        log.error("%s", err)
        return 2
