"""The user-study kit (Table II): anonymised questionnaires from result folders, and mean ranks
from filled-in response CSVs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semani.evaluation.user_study import (
    InvalidResponseError,
    UserStudyError,
    main,
    make_study,
    markdown_table,
    read_responses,
    score_responses,
)

METHODS = ["ManiGAN", "SeMani-Diff", "BlendedLDM"]
STEMS = ["bird_0001", "bird_0002", "flower_0003", "flower_0004"]


def _colour(m: int, c: int) -> tuple[int, int, int]:
    """A colour unique to (method m, case c); m = -1 for the input image."""
    return (40 * (m + 2), 50 * c + 10, 200)


@pytest.fixture
def results(tmp_path: Path) -> dict:
    """3 method folders x 4 cases of solid 8x8 PNGs, the inputs (JPEGs) and a texts CSV."""
    root = tmp_path / "results"
    methods = {}
    for m, name in enumerate(METHODS):
        folder = root / f"folder_{name.lower()}"
        folder.mkdir(parents=True)
        for c, stem in enumerate(STEMS):
            Image.new("RGB", (8, 8), _colour(m, c)).save(folder / f"{stem}.png")
        methods[name] = folder
    inputs = root / "inputs"
    inputs.mkdir()
    for c, stem in enumerate(STEMS):
        Image.new("RGB", (8, 8), _colour(-1, c)).save(inputs / f"{stem}.jpg", quality=100)
    texts = root / "texts.csv"
    with texts.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["file", "text"]]
            + [[f"{s}.png", f"a red thing, case {i}"] for i, s in enumerate(STEMS)]
        )
    return {"methods": methods, "inputs": inputs, "texts": texts, "root": root}


def _make(results: dict, out: Path, **kw) -> Path:
    return make_study(results["methods"], results["inputs"], results["texts"], out, **kw)


def test_make_writes_an_anonymous_questionnaire(results: dict, tmp_path: Path) -> None:
    out = _make(results, tmp_path / "study", seed=3)
    key = json.loads((out / "key.json").read_text())
    assert key["methods"] == METHODS and len(key["cases"]) == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        [f"{c}_input.png" for c in key["cases"]]
        + [f"{c}_{lab}.png" for c in key["cases"] for lab in "ABC"]
    )
    page = (out / "index.html").read_text()
    forbidden = [*METHODS, *STEMS, "key.json", "folder_", "inputs", ".jpg"]
    for word in forbidden:
        assert word.lower() not in page.lower(), word
    for c in key["cases"]:
        assert f"images/{c}_input.png" in page and f"images/{c}_C.png" in page
    for q in ("Consistency", "Preservation", "Fidelity"):
        assert q in page
    assert "http" not in page  # self-contained: nothing fetched from the network

    # key.json inverts the anonymisation: label -> the method whose image it is
    for case, options in key["cases"].items():
        c = STEMS.index(Path(key["files"][case]).stem)
        assert sorted(options.values()) == sorted(METHODS)  # a permutation of the methods
        for label, method in options.items():
            im = np.asarray(Image.open(out / "images" / f"{case}_{label}.png"))
            assert tuple(im[0, 0]) == _colour(METHODS.index(method), c)
        im = np.asarray(Image.open(out / "images" / f"{case}_input.png")).astype(int)
        assert np.abs(im[0, 0] - _colour(-1, c)).max() <= 3  # a JPEG input, re-encoded

    with (out / "responses_template.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["respondent", "case", "question", "A", "B", "C"]
    assert len(rows) == 1 + 4 * 3 and all(r[0] == "" and r[3:] == ["", "", ""] for r in rows[1:])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_orders_are_seeded(results: dict, tmp_path: Path) -> None:
    def orders(seed: int, name: str) -> list[list[str]]:
        out = _make(results, tmp_path / name, seed=seed)
        key = json.loads((out / "key.json").read_text())
        return [[o[lab] for lab in "ABC"] for o in key["cases"].values()]

    first = orders(0, "a")
    again = orders(0, "b")
    assert first == again
    assert (tmp_path / "a" / "index.html").read_bytes() == (
        tmp_path / "b" / "index.html"
    ).read_bytes()
    # some seed gives different orders to different cases
    assert any(len({tuple(o) for o in orders(s, f"s{s}")}) > 1 for s in range(5))


def test_cases_and_questions_options(results: dict, tmp_path: Path) -> None:
    out = _make(results, tmp_path / "two", cases=2, seed=1, questions=["fidelity"])
    key = json.loads((out / "key.json").read_text())
    assert list(key["cases"]) == ["case01", "case02"] and key["questions"] == ["fidelity"]
    assert "Consistency" not in (out / "index.html").read_text()
    with pytest.raises(UserStudyError, match="only 4"):
        _make(results, tmp_path / "five", cases=5)
    with pytest.raises(UserStudyError, match="questions"):
        _make(results, tmp_path / "q", questions=["realism"])
    assert not (tmp_path / "five").exists() and not (tmp_path / "q").exists()


def test_texts_json_and_incomplete_cases(results: dict, tmp_path: Path) -> None:
    texts = tmp_path / "texts.json"  # keyed by the input's file name (a .jpg; outputs are .png)
    texts.write_text(json.dumps({f"{s}.jpg": f"text {i}" for i, s in enumerate(STEMS)}))
    (results["methods"]["BlendedLDM"] / f"{STEMS[2]}.png").unlink()  # one method lacks a case
    out = make_study(results["methods"], results["inputs"], texts, tmp_path / "study")
    key = json.loads((out / "key.json").read_text())
    assert sorted(key["files"].values()) == sorted(f"{s}.png" for s in STEMS if s != STEMS[2])
    assert "text 0" in (out / "index.html").read_text()
    texts.write_text("{not json")
    with pytest.raises(UserStudyError, match="not valid JSON"):
        make_study(results["methods"], results["inputs"], texts, tmp_path / "x")


def test_overwrite(results: dict, tmp_path: Path) -> None:
    out = _make(results, tmp_path / "study", seed=0)
    before = (out / "key.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _make(results, out, seed=1)
    assert (out / "key.json").read_text() == before
    # a failed build leaves the old folder as it was, and no temp folder
    (results["methods"]["ManiGAN"] / f"{STEMS[0]}.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match=STEMS[0]):
        _make(results, out, seed=1, overwrite=True)
    assert (out / "key.json").read_text() == before
    Image.new("RGB", (8, 8), _colour(0, 0)).save(results["methods"]["ManiGAN"] / f"{STEMS[0]}.png")
    (out / "stale.txt").write_text("x")
    _make(results, out, seed=1, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "key.json").read_text() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "study"]  # no temp left


# -- scoring --------------------------------------------------------------------------------------
KEY = {
    "seed": 0,
    "methods": ["M1", "M2", "M3"],
    "questions": ["consistency", "fidelity"],
    "cases": {
        "case01": {"A": "M1", "B": "M2", "C": "M3"},
        "case02": {"A": "M3", "B": "M1", "C": "M2"},
    },
    "files": {"case01": "x.png", "case02": "y.png"},
}
GOOD = [
    ["respondent", "case", "question", "A", "B", "C"],
    ["r1", "case01", "consistency", "1", "2", "3"],  # M1 1, M2 2, M3 3
    ["r1", "case02", "consistency", "2", "3", "1"],  # M3 2, M1 3, M2 1
    ["r2", "case01", "Consistency", "1", "3", "2"],  # M1 1, M2 3, M3 2
    ["", "", "", "", "", ""],  # a blank line of a spreadsheet export
    ["r1", "case01", "fidelity", "3", "2.0", "1"],  # M1 3, M2 2, M3 1
]


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    p = tmp_path / "key.json"
    p.write_text(json.dumps(KEY))
    return p


def test_score_gives_hand_computed_mean_ranks(tmp_path: Path, key_path: Path) -> None:
    scores, dropped = score_responses(_write(tmp_path / "r.csv", GOOD), key_path)
    assert dropped == 0
    got = {(s.method, s.question): s for s in scores}
    # consistency: M1 (1, 3, 1), M2 (2, 1, 3), M3 (3, 2, 2); fidelity: M1 3, M2 2, M3 1
    assert got["M1", "consistency"].mean_rank == pytest.approx(5 / 3)
    assert got["M2", "consistency"].mean_rank == pytest.approx(2.0)
    assert got["M3", "consistency"].mean_rank == pytest.approx(7 / 3)
    assert got["M1", "consistency"].se == pytest.approx(2 / 3)  # sd sqrt(4/3) / sqrt(3)
    assert got["M2", "consistency"].se == pytest.approx(1 / math.sqrt(3))
    assert all(got[m, "consistency"].n == 3 for m in KEY["methods"])
    assert [got[m, "fidelity"].mean_rank for m in ("M1", "M2", "M3")] == [3.0, 2.0, 1.0]
    assert got["M1", "fidelity"].n == 1 and math.isnan(got["M1", "fidelity"].se)
    assert [s.method for s in scores[:2]] == ["M1", "M1"]  # the key's order

    table = markdown_table(scores)
    assert "| Method | Consistency (↓) | Fidelity (↓) |" in table
    assert "| M1 | 1.67 ± 0.67 | 3.00 |" in table
    assert "consistency 3, fidelity 1" in table


BAD_ROWS = {
    "outside": (["r1", "case01", "consistency", "1", "2", "4"], "rank.s. outside 1..3: C=4"),
    "zero": (["r1", "case01", "consistency", "0", "1", "2"], "rank.s. outside 1..3: A=0"),
    "not a number": (
        ["r1", "case01", "consistency", "1", "two", "3"],
        "rank.s. outside 1..3: B=two",
    ),
    "repeated": (["r1", "case01", "consistency", "1", "1", "2"], "repeated rank"),
    "case": (["r1", "case09", "consistency", "1", "2", "3"], "unknown case 'case09'"),
    "question": (["r1", "case01", "preservation", "1", "2", "3"], "unknown question"),
    "empty cell": (["r1", "case01", "consistency", "1", "", "3"], "missing rank in column"),
    "short row": (["r1", "case01", "consistency", "1", "2"], "missing rank in column"),
    "twice": (
        ["r1", "case02", "consistency", "1", "2", "3"],
        "'r1' already answered case02 / consistency in row 3",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_invalid_rows_name_their_row(tmp_path: Path, key_path: Path, kind: str) -> None:
    row, problem = BAD_ROWS[kind]
    path = _write(tmp_path / "r.csv", GOOD[:3] + [row] + GOOD[3:])  # the bad row is row 4
    with pytest.raises(InvalidResponseError, match=f"row 4: {problem}") as err:
        score_responses(path, key_path)
    assert err.value.row == 4 and str(path) in str(err.value)
    # --skip-invalid drops it, counts it, and scores the rest as before
    scores, dropped = score_responses(path, key_path, skip_invalid=True)
    assert dropped == 1
    assert scores == score_responses(_write(tmp_path / "ok.csv", GOOD), key_path)[0]


def test_a_missing_column_is_an_error(tmp_path: Path, key_path: Path) -> None:
    rows = [[c for j, c in enumerate(r) if j != 4] for r in GOOD]  # no column B
    with pytest.raises(InvalidResponseError, match="row 1: missing column.*B") as err:
        read_responses(_write(tmp_path / "r.csv", rows), KEY, skip_invalid=True)
    assert err.value.row == 1


def test_cli_end_to_end(results: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "study"
    methods = [f"{n}={d}" for n, d in results["methods"].items()]
    argv = ["make", "--methods", *methods, "--inputs", str(results["inputs"])]
    argv += ["--texts", str(results["texts"]), "--out", str(out), "--cases", "3", "--seed", "7"]
    assert main(argv) == 0
    assert main(argv) == 2  # exists, no --overwrite
    assert main([*argv, "--overwrite"]) == 0

    key = json.loads((out / "key.json").read_text())
    # everyone ranks SeMani-Diff first, ManiGAN last on every question
    order = {"SeMani-Diff": "1", "BlendedLDM": "2", "ManiGAN": "3"}
    rows = [["respondent", "case", "question", "A", "B", "C"]]
    for who in ("p1", "p2"):
        for case, options in key["cases"].items():
            for q in key["questions"]:
                rows.append([who, case, q] + [order[options[lab]] for lab in "ABC"])
    answers = _write(tmp_path / "answers.csv", rows)
    table_csv = tmp_path / "table.csv"
    capsys.readouterr()
    argv = ["score", str(answers), "--key", str(out / "key.json"), "--out", str(table_csv)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| SeMani-Diff | 1.00 ± 0.00 | 1.00 ± 0.00 | 1.00 ± 0.00 |" in printed
    with table_csv.open(newline="") as f:
        got = {(r["method"], r["question"]): r for r in csv.DictReader(f)}
    assert float(got["ManiGAN", "fidelity"]["mean_rank"]) == 3.0
    assert got["ManiGAN", "fidelity"]["n"] == "6"  # 2 respondents x 3 cases

    _write(answers, rows[:2] + [[*rows[2][:3], "1", "1", "1"]])
    assert main(["score", str(answers), "--key", str(out / "key.json")]) == 2
    assert main(["score", str(answers), "--key", str(out / "key.json"), "--skip-invalid"]) == 0
