"""Table I as text: one run's row (Markdown, CSV columns, LaTeX) and several runs merged beside
the paper's numbers (`scripts/make_table.py`).

A run of `python eval.py protocol=table1 method=<method> data=<dataset>` writes one row
(`TABLE1_COLUMNS`) to ``<run>/table1.csv``. `merge_rows` lays rows of several runs out as the
paper's Table I: one line per (method, source), source "paper"
(`semani.evaluation.paper_table1`) or "ours", and per data set the paper's four columns IS
(mean ± std), CLIP-score, R@10 and L2-error.

    python scripts/make_table.py logs/table1_*/runs/*        # Markdown on stdout
    python scripts/make_table.py RUN_A RUN_B --latex --out table1.tex
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from semani.evaluation.paper_table1 import PAPER_DATASETS, PAPER_METHODS, PAPER_TABLE1
from semani.utils.atomic import write_text

log = logging.getLogger(__name__)

__all__ = [
    "TABLE1_COLUMNS",
    "latex_row_table",
    "main",
    "markdown_row_table",
    "merge_rows",
    "read_rows",
]

# table1.csv: what the run is, how many images were scored (n; of them not_found: scored as the
# unchanged input; skipped: left out), which (image_set: a hash of the scored keys), the metrics
# (R@N in %)
TABLE1_COLUMNS = (
    *("method", "dataset", "mask", "n", "not_found", "skipped", "image_set"),
    *("is_mean", "is_std", "clip_score", "r1", "r5", "r10", "l2"),
    *("seam", "seam_input"),  # not the paper's: semani.metrics.seam
)
# one run's table: (header, metric key); "is" is mean ± std
RUN_COLUMNS = (("IS", "is"), ("CLIP-score", "clip_score"), ("R@1", "r1"), ("R@5", "r5"),
               ("R@10", "r10"), ("L2-error", "l2"), ("seam", "seam"),
               ("seam of the input", "seam_input"))  # fmt: skip
# the paper's columns per data set
PAPER_COLUMNS = (("IS", "is"), ("CLIP-score", "clip_score"), ("R@10", "r10"), ("L2", "l2"))
DIGITS = {"l2": 4, "seam": 3, "seam_input": 3}  # decimals (2 unless listed); the paper's L2 has 2
DATASET_ORDER = (*PAPER_DATASETS, "ShapesWorld")


def _num(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    v = float(v)
    return None if math.isnan(v) else v


def format_value(
    row: Mapping[str, Any], key: str, latex: bool = False, paper: bool = False
) -> str:
    """`key` of `row` as text; "is" is "mean ± std"; a missing value is a dash."""
    digits = 2 if paper else DIGITS.get(key, 2)
    if key == "is":
        mean, std = _num(row, "is_mean"), _num(row, "is_std")
        if mean is None:
            return "--" if latex else "–"
        if std is None:
            return f"{mean:.2f}"
        return f"${mean:.2f} \\pm {std:.2f}$" if latex else f"{mean:.2f} ± {std:.2f}"
    v = _num(row, key)
    if v is None:
        return "--" if latex else "–"
    return f"{v:.{digits}f}"


def _tex(text: Any) -> str:
    out = str(text)
    for ch in "\\&%$#_{}":
        out = out.replace(ch, "\\" + ch if ch != "\\" else "\\textbackslash{}")
    return out


def markdown_row_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One run's Table-I rows with every metric, as Markdown."""
    head = ["Method", "Data set", *(h for h, _ in RUN_COLUMNS), "n", "not found"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["dataset"], *(format_value(r, k) for _, k in RUN_COLUMNS),
                 r["n"], r.get("not_found", "")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def latex_row_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One run's Table-I rows with every metric, as a LaTeX tabular (booktabs)."""
    head = ["Method", "Data set", *(h for h, _ in RUN_COLUMNS), "$n$", "not found"]
    lines = ["\\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", "\\toprule",
             " & ".join(h if "$" in h else _tex(h) for h in head) + " \\\\",
             "\\midrule"]  # fmt: skip
    for r in rows:
        cells = [_tex(r["method"]), _tex(r["dataset"])]
        cells += [format_value(r, k, latex=True) for _, k in RUN_COLUMNS]
        cells += [str(r["n"]), str(r.get("not_found", ""))]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# several runs beside the paper


def read_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows of each ``<run>/table1.csv`` (a run folder or the CSV itself)."""
    rows = []
    for p in paths:
        p = Path(p)
        csv_path = p / "table1.csv" if p.is_dir() else p
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"{csv_path} does not exist: pass the output folders of "
                "`python eval.py protocol=table1 method=<method> data=<dataset>` runs (or their "
                "table1.csv)"
            )
        with csv_path.open(newline="") as f:
            for r in csv.DictReader(f):
                rows.append({**r, "run": str(csv_path.parent)})
    return rows


def _order(values: Sequence[str], first: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def merge_rows(
    rows: Sequence[Mapping[str, Any]], paper: bool = True
) -> tuple[list[str], list[dict[str, Any]]]:
    """(data sets, lines): one line per (method, source) with a `(dataset, key)` entry per value;
    the paper's methods and data sets first, in its order. Two runs of the same method on the
    same data set are an error, and so are runs of one data set scored on different image sets
    (their `image_set` differs: different caps, seeds or skipped images), which would not
    compare."""
    ours: dict[tuple[str, str], Mapping[str, Any]] = {}
    image_sets: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        first = image_sets.setdefault(str(r["dataset"]), r)
        if r.get("image_set") != first.get("image_set"):
            raise ValueError(
                f"{r['method']} and {first['method']} on {r['dataset']} were scored on different "
                f"images (image_set {r.get('image_set') or 'unknown'} in {r.get('run')}, "
                f"{first.get('image_set') or 'unknown'} in {first.get('run')}): rerun them with "
                "the same table1.seed, max_images and not_found=unchanged"
            )
        key = (str(r["method"]), str(r["dataset"]))
        if key in ours:
            raise ValueError(
                f"two runs give {key[0]} on {key[1]}: {ours[key].get('run')} and {r.get('run')};"
                " pass one of them"
            )
        ours[key] = r
    sources = [("paper", PAPER_TABLE1)] if paper else []
    sources.append(("ours", ours))
    datasets = _order([d for _, d in ours] + list(PAPER_DATASETS if paper else ()), DATASET_ORDER)
    methods = _order([m for m, _ in ours] + list(PAPER_METHODS if paper else ()), PAPER_METHODS)
    lines = []
    for m in methods:
        for source, table in sources:
            cells = {d: table[m, d] for d in datasets if (m, d) in table}
            if cells:
                lines.append({"method": m, "source": source, "cells": cells})
    return datasets, lines


def merged_markdown(datasets: Sequence[str], lines: Sequence[Mapping[str, Any]]) -> str:
    head = ["Model", "source"] + [f"{d} {h}" for d in datasets for h, _ in PAPER_COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in lines:
        cells = [line["method"], line["source"]]
        for d in datasets:
            row = line["cells"].get(d, {})
            cells += [format_value(row, k, paper=line["source"] == "paper")
                      for _, k in PAPER_COLUMNS]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def merged_latex(datasets: Sequence[str], lines: Sequence[Mapping[str, Any]]) -> str:
    k = len(PAPER_COLUMNS)
    out = ["\\begin{tabular}{ll" + ("r" * k) * len(datasets) + "}", "\\toprule",
           " & & " + " & ".join(f"\\multicolumn{{{k}}}{{c}}{{{_tex(d)}}}" for d in datasets)
           + " \\\\",
           "Model & & " + " & ".join(_tex(h) for _ in datasets for h, _ in PAPER_COLUMNS)
           + " \\\\", "\\midrule"]  # fmt: skip
    for line in lines:
        cells = [_tex(line["method"]), line["source"]]
        for d in datasets:
            row = line["cells"].get(d, {})
            cells += [format_value(row, key, latex=True, paper=line["source"] == "paper")
                      for _, key in PAPER_COLUMNS]  # fmt: skip
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """CLI of ``scripts/make_table.py``: print (or write) the merged Table I; returns it."""
    p = argparse.ArgumentParser(description="Merge table1.csv rows of runs into Table I.")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or their table1.csv)")
    p.add_argument("--latex", action="store_true", help="a LaTeX tabular (booktabs)")
    p.add_argument("--no-paper", action="store_true", help="leave the paper's numbers out")
    p.add_argument("--out", type=Path, help="write here instead of stdout")
    args = p.parse_args(argv)
    try:
        datasets, lines = merge_rows(read_rows(args.runs), paper=not args.no_paper)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    text = (merged_latex if args.latex else merged_markdown)(datasets, lines)
    if args.out is not None:
        write_text(args.out, text)
        log.info("wrote %s", args.out)
    else:
        sys.stdout.write(text)
    return text
