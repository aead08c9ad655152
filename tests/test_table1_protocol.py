"""The Table-I protocol (`eval.py protocol=table1 method=<method> data=<dataset>`) on 6
ShapesWorld test images with tiny random models: tables and grid, resume after a crash,
predictions, sharding, the entity words and the one-line errors of missing weights."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from semani.evaluation.table1 import plan_cases, shard
from semani.evaluation.tables import TABLE1_COLUMNS
from semani.evaluation.words import caption_entity_words, pick_word
from semani.manipulation.diff_editor import DiffEditor
from semani.metrics import ShapesClassifier
from semani.modules.clip import TINY_CLIP_NAME
from semani.tasks.eval import main as eval_main
from semani.tasks.table1 import table1
from tests.conftest import compose

N = 6  # images per run
EDIT = DiffEditor.edit  # the real one
METRICS = ("is_mean", "is_std", "clip_score", "r1", "r5", "r10", "l2")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ShapesWorld IS classifier, exported as experiment=classifier_shapes does."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "shapes_classifier.pt"
    torch.save(ShapesClassifier(width=4).export(), path)
    return path


def _overrides(shapes_root: Path, classifier: Path, *extra: str) -> list[str]:
    return [
        f"data.root={shapes_root}", f"table1.max_images={N}", "table1.grid_rows=3",
        "table1.grid_tile=32", "table1.batch_size=4", "metrics.is_splits=2",
        "metrics.recall_candidates=10", f"metrics.clip_model={TINY_CLIP_NAME}",
        "metrics.clip_pretrained=null", f"metrics.classifier.path={classifier}",
        "extras.print_config=false", *extra,
    ]  # fmt: skip


def _diff_cfg(out: Path, shapes_root: Path, classifier: Path, inpaint: Path, *extra: str):
    return compose(
        "eval",
        ["protocol=table1", "method=semani_diff_shapes", "data=shapes",
         f"editor.source={inpaint}", "editor.steps=2",
         "editor.guidance_scale=1.0", "table1.mask=ground_truth",
         *_overrides(shapes_root, classifier, *extra)],
        out,
    )  # fmt: skip


class CountEdits:
    """Counts `DiffEditor.edit` calls; raises after `fail_after` of them (a crash mid-run)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_after = fail_after

    def __call__(self, editor, image, mask, text, **kwargs):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(text)
        return EDIT(editor, image, mask, text, **kwargs)

    def __get__(self, editor, owner=None):  # a method when set on the class
        return functools.partial(self, editor) if editor is not None else self


def _row(out: Path) -> dict[str, str]:
    with (out / "table1.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    return row


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
    shapes_root: Path,
    classifier: Path,
    inpaint_folder: Path,
) -> dict[str, Any]:
    """One uninterrupted SeMani-Diff run (ground-truth masks), its metrics and edit calls."""
    out = tmp_path_factory.mktemp("table1_ref")
    counter = CountEdits()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(DiffEditor, "edit", counter)
        metrics = eval_main(_diff_cfg(out, shapes_root, classifier, inpaint_folder))
    return {"out": out, "metrics": metrics, "calls": list(counter.calls)}


# -- the plan ---------------------------------------------------------------------------------
def test_plan_targets_come_from_other_images_and_do_not_depend_on_the_order(
    shapes_root: Path,
) -> None:
    from semani.data.shapes import ShapesWorldDataset

    ds = ShapesWorldDataset(shapes_root, "test", image_size=64, context_length=40)
    cases = plan_cases(ds, range(len(ds)), "entity", None, seed=3)
    for c in cases:
        assert c.target_text not in ds.captions[c.index]  # another image's caption
        assert any(c.target_text in caps for caps in ds.captions)
        assert c.own_caption in ds.captions[c.index]
        assert c.word in ds[c.index]["entity_names"]
    again = plan_cases(ds, [5, 2], "entity", None, seed=3)  # another order and subset
    assert again == [cases[5], cases[2]]
    assert plan_cases(ds, [5], "entity", None, seed=4)[0] != cases[5]
    assert {c.word for c in plan_cases(ds, [0, 1], "fixed", "shape", 0)} == {"shape"}


def test_shards_are_disjoint_and_cover_every_case() -> None:
    items = list(range(11))
    for world in (1, 2, 3, 4):
        parts = [shard(items, r, world) for r in range(world)]
        assert sorted(itertools.chain(*parts)) == items
        assert sum(len(p) for p in parts) == len(items)  # disjoint
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(items, 2, 2)


def test_coco_words_come_from_the_caption() -> None:
    assert caption_entity_words("Two men riding horses next to a fire hydrant.") == [
        ("man", "person"), ("horse", "horse"), ("fire hydrant", "fire hydrant")]  # fmt: skip
    assert caption_entity_words("an orange sofa in a room") == [("sofa", "couch")]
    rng = np.random.default_rng(0)
    picks = {pick_word("caption", rng, captions=["a dog and a cat", "a cat"]) for _ in range(20)}
    assert picks == {("dog", "vocabulary"), ("cat", "vocabulary")}
    assert pick_word("caption", rng, captions=["a sunset over the sea"]) == (None, "none")
    with pytest.raises(ValueError, match="table1.word"):
        pick_word("fixed", rng)


def test_caption_nouns_from_a_tagger_include_stuff_nouns(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a part-of-speech tagger (spaCy's, faked here by its interface) every noun of the
    captions is a candidate, "field" included; the vocabulary rule is the fallback."""
    import sys
    import types

    from semani.evaluation.words import NounTagger, caption_words, load_tagger

    class Tok:
        def __init__(self, text: str, pos: str) -> None:
            self.text, self.pos_ = text, pos
            self.lemma_ = {"dogs": "dog"}.get(text, text)

    tags = {"two": "NUM", "dogs": "NOUN", "run": "VERB", "on": "ADP", "the": "DET",
            "grassy": "ADJ", "field": "NOUN", "a": "DET", "tennis": "NOUN",
            "racket": "NOUN", "sunset": "NOUN", "over": "ADP", "sea": "NOUN"}  # fmt: skip
    fake = types.SimpleNamespace(
        load=lambda name, disable=(): lambda text: [Tok(w, tags.get(w, "X")) for w in text.split()]
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "spacy", fake)
    tagger = load_tagger("auto")
    assert isinstance(tagger, NounTagger)
    assert tagger("two dogs run on the grassy field") == ["dog", "field"]
    assert tagger("a tennis racket") == ["tennis racket"]
    words, rule = caption_words(
        ["two dogs run on the grassy field", "a sunset over the sea"], tagger
    )
    assert (words, rule) == (["dog", "field", "sunset", "sea"], "spacy")
    rng = np.random.default_rng(0)
    got = {pick_word("caption", rng, captions=["the field"], tagger=tagger) for _ in range(3)}
    assert got == {("field", "spacy")}
    monkeypatch.setitem(sys.modules, "spacy", None)  # not installed: the vocabulary rule
    assert load_tagger("auto") is None
    with pytest.raises(ImportError, match="spacy download en_core_web_sm"):
        load_tagger("spacy")


# -- a run --------------------------------------------------------------------------------------
def test_run_writes_the_table_row_images_and_grid(reference: dict[str, Any]) -> None:
    out, metrics = reference["out"], reference["metrics"]
    assert len(reference["calls"]) == 2 * N  # the target text and the own caption per image
    row = _row(out)
    assert list(row) == list(TABLE1_COLUMNS)
    assert (row["method"], row["dataset"], row["mask"]) == ("SeMani-Diff", "ShapesWorld",
                                                            "ground_truth")  # fmt: skip
    assert (int(row["n"]), int(row["skipped"])) == (N, 0)
    for key in METRICS:
        assert float(row[key]) == pytest.approx(metrics[f"table1/{key}"])
    assert metrics["table1/is_mean"] >= 1.0 and 0 <= metrics["table1/r1"] <= 100
    assert 0 < metrics["table1/l2"] < 1  # the own-caption edit changed the mask only
    md = (out / "table1.md").read_text()
    seam, reference_seam = metrics["table1/seam"], metrics["table1/seam_input"]
    assert 0 <= reference_seam < 1 and 0 <= seam < 1  # mean |colour step| across the border
    assert float(row["seam"]) == pytest.approx(seam)
    head = (
        "| Method | Data set | IS | CLIP-score | R@1 | R@5 | R@10 | L2-error | seam | "
        "seam of the input | n | not found |"
    )
    assert head in md
    assert f"| SeMani-Diff | ShapesWorld | {metrics['table1/is_mean']:.2f} ± " in md
    tex = (out / "table1.tex").read_text()
    assert "\\begin{tabular}" in tex and "SeMani-Diff & ShapesWorld & $" in tex
    with (out / "plan.csv").open() as f:
        plan = list(csv.DictReader(f))
    assert len(plan) == N and set(plan[0]) == {"index", "key", "word", "target_text",
                                                "own_caption", "seed", "word_rule"}  # fmt: skip
    assert {c["word_rule"] for c in plan} == {"entity"}
    for case in plan:
        image = np.asarray(Image.open(out / "images" / f"{case['key']}.png"))
        mask = np.asarray(Image.open(out / "images" / "masks" / f"{case['key']}.png")) > 0
        meta = json.loads((out / "images" / "meta" / f"{case['key']}.json").read_text())
        assert image.shape == (64, 64, 3)
        assert (out / "images" / "own" / f"{case['key']}.png").is_file()
        assert meta["word"] == case["word"] and meta["target_text"] == case["target_text"]
        assert meta["mask"]["pixels"] == int(mask.sum()) > 0
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 32, 14 + 3 * (32 + 14))  # 3 columns, 3 rows and captions
    assert not list(out.rglob("*.tmp"))


def test_resume_after_a_crash_edits_only_what_is_missing(
    tmp_path: Path,
    reference: dict[str, Any],
    shapes_root: Path,
    classifier: Path,
    inpaint_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    k = 5  # two images and a half: the 3rd image's own-caption edit is lost
    crash = CountEdits(fail_after=k)
    monkeypatch.setattr(DiffEditor, "edit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        eval_main(_diff_cfg(tmp_path, shapes_root, classifier, inpaint_folder))
    assert len(list((tmp_path / "images" / "meta").glob("**/*.json"))) == 2
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.png")}
    assert len(written) == k + 3  # k edits and 3 masks
    resume = CountEdits()
    monkeypatch.setattr(DiffEditor, "edit", resume)
    other = tmp_path / "second"  # a new Hydra folder; table1.out_dir points at the first run
    metrics = eval_main(_diff_cfg(other, shapes_root, classifier, inpaint_folder,
                                  f"table1.out_dir={tmp_path}"))  # fmt: skip
    assert len(resume.calls) == 2 * N - k
    assert resume.calls == reference["calls"][k:]  # the same texts, in the same order
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # not rewritten
    assert metrics == pytest.approx(reference["metrics"])  # the same numbers as one go
    assert _row(tmp_path) == _row(reference["out"]) and not (other / "table1.csv").exists()
    # another word for the same images: their meta files disagree
    with pytest.raises(SystemExit, match="was made for .* use a new table1.out_dir"):
        eval_main(_diff_cfg(other, shapes_root, classifier, inpaint_folder,
                            f"table1.out_dir={tmp_path}", "table1.word_from=fixed",
                            "table1.word=shape"))  # fmt: skip


# -- predictions ----------------------------------------------------------------------------------
def _pred_cfg(out: Path, shapes_root: Path, classifier: Path, folder: Path, *extra: str):
    return compose(
        "eval",
        ["protocol=table1", "method=predictions", "data=shapes", "method_name=ManiGAN",
         f"table1.predictions_dir={folder}", *_overrides(shapes_root, classifier, *extra)],
        out,
    )  # fmt: skip


def test_predictions_score_a_folder_as_the_run_that_made_it(
    tmp_path: Path, reference: dict[str, Any], shapes_root: Path, classifier: Path
) -> None:
    folder = tmp_path / "manigan"
    shutil.copytree(reference["out"] / "images", folder, ignore=shutil.ignore_patterns("m*"))
    metrics = eval_main(_pred_cfg(tmp_path / "run", shapes_root, classifier, folder))
    # the same images, the same plan; no masks, so no seam
    unmasked = {k: v for k, v in reference["metrics"].items() if "seam" not in k}
    assert metrics == pytest.approx(unmasked)
    row = _row(tmp_path / "run")
    assert (row["method"], row["mask"], row["n"]) == ("ManiGAN", "none", str(N))
    assert (tmp_path / "run" / "grid.png").is_file()

    png = next(folder.glob("*/*.png"))  # another format and size is read too
    Image.open(png).resize((128, 128), Image.NEAREST).save(png.with_suffix(".jpg"))
    png.unlink()
    metrics = eval_main(_pred_cfg(tmp_path / "jpg", shapes_root, classifier, folder))
    assert metrics["table1/n"] == N
    assert metrics["table1/l2"] == pytest.approx(reference["metrics"]["table1/l2"])

    missing = next(folder.glob("own/*/*.png"))
    missing.unlink()
    with pytest.raises(SystemExit) as err:
        eval_main(_pred_cfg(tmp_path / "run2", shapes_root, classifier, folder))
    msg = str(err.value)
    assert f"1 of {2 * N} predicted images are missing" in msg and str(missing) in msg
    assert "plan.csv" in msg and "\n" not in msg
    metrics = eval_main(_pred_cfg(tmp_path / "run3", shapes_root, classifier, folder,
                                  "table1.l2=false"))  # fmt: skip
    assert "table1/l2" not in metrics and "table1/r10" in metrics
    absent = tmp_path / "pretrained" / "shapes_classifier.pt"  # the metrics' own weights
    with pytest.raises(SystemExit) as err:
        eval_main(_pred_cfg(tmp_path / "run4", shapes_root, absent, folder, "table1.l2=false"))
    assert str(absent) in str(err.value) and "experiment=classifier_shapes" in str(err.value)


def test_images_without_the_entity_are_scored_unchanged_skipped_or_stop_the_run(
    tmp_path: Path, shapes_root: Path, classifier: Path, inpaint_folder: Path
) -> None:
    from semani.data.shapes import ShapesWorldDataset
    from semani.evaluation.table1 import as_uint8

    word = ["table1.word_from=fixed", "table1.word=circle", "table1.l2=false"]
    cfg = _diff_cfg(tmp_path / "run", shapes_root, classifier, inpaint_folder, *word)
    metrics = eval_main(cfg)  # table1.not_found=unchanged, the default
    ds = ShapesWorldDataset(shapes_root, "test", image_size=64, context_length=40)
    with (tmp_path / "run" / "plan.csv").open() as f:
        plan = list(csv.DictReader(f))
    circles = [p for p in plan if "circle" in ds[int(p["index"])]["entity_names"]]
    assert 0 < len(circles) < N  # the data: some images have a circle
    row = _row(tmp_path / "run")
    assert (int(row["n"]), int(row["not_found"]), int(row["skipped"])) == (
        N, N - len(circles), 0)  # fmt: skip
    assert metrics["table1/n"] == N and metrics["table1/not_found"] == N - len(circles)
    for p in plan:  # a failed edit is scored as the unchanged input
        if p not in circles:
            out = np.asarray(Image.open(tmp_path / "run" / "images" / f"{p['key']}.png"))
            assert np.array_equal(out, as_uint8(ds[int(p["index"])]["image"]))
    metas = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("meta/**/*.json")]
    missed = [m for m in metas if m.get("not_found")]
    assert len(missed) == N - len(circles)
    assert "no ground-truth entity has that name" in missed[0]["not_found"]

    eval_main(_diff_cfg(tmp_path / "skip", shapes_root, classifier, inpaint_folder, *word,
                        "table1.not_found=skip"))  # fmt: skip
    skipped = _row(tmp_path / "skip")
    assert (int(skipped["n"]), int(skipped["skipped"])) == (len(circles), N - len(circles))
    assert skipped["image_set"] != row["image_set"]  # make_table.py refuses to compare them
    with pytest.raises(SystemExit, match="^error: no entity matches 'circle'"):
        eval_main(_diff_cfg(tmp_path / "raise", shapes_root, classifier, inpaint_folder, *word,
                            "table1.not_found=raise"))  # fmt: skip


# -- two processes --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    metrics = table1(cfg)
    torch.save(metrics, Path(out) / f"rank{rank}.pt")


def test_two_torchrun_ranks_give_the_single_process_table(
    tmp_path: Path, reference: dict[str, Any], shapes_root: Path, classifier: Path
) -> None:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method (Linux)")
    folder = reference["out"] / "images"
    single = eval_main(_pred_cfg(tmp_path / "single", shapes_root, classifier, folder))
    cfg = _pred_cfg(tmp_path / "ddp", shapes_root, classifier, folder)
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")  # fmt: skip
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(single)
    ddp, one = _row(tmp_path / "ddp"), _row(tmp_path / "single")
    assert {k: ddp[k] for k in ("method", "n", "skipped")} == {"method": "ManiGAN", "n": str(N),
                                                               "skipped": "0"}  # fmt: skip
    assert [float(ddp[k]) for k in METRICS] == pytest.approx([float(one[k]) for k in METRICS])
    assert (tmp_path / "ddp" / "grid.png").is_file()


# -- alignment and the configs --------------------------------------------------------------------
def test_aligned_masks_with_the_token_grid_of_semani_trans(
    tmp_path: Path, shapes_root: Path, classifier: Path
) -> None:
    from tests.test_semani_trans_module import make_module

    module = make_module(clip=None, lambda_sem=0.0)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "trans.ckpt")
    cfg = compose(
        "eval",
        ["protocol=table1", "method=semani_trans_shapes", "data=shapes",
         f"editor.ckpt={tmp_path / 'trans.ckpt'}",
         "editor.filter_thres=0.5", "alignment/segmenter=ground_truth",
         "~alignment.segmenter.model_name_or_path",
         f"alignment.scorer.model_name={TINY_CLIP_NAME}", "alignment.scorer.pretrained=null",
         *_overrides(shapes_root, classifier, "table1.max_images=3", "table1.l2=false",
                     "metrics.is_splits=1")],
        tmp_path / "run",
    )  # fmt: skip
    metrics = eval_main(cfg)
    assert metrics["table1/n"] == 3
    for meta in (tmp_path / "run" / "images" / "meta").rglob("*.json"):
        info = json.loads(meta.read_text())
        sims = info["alignment"]["similarities"]
        assert info["alignment"]["chosen"] and len(sims) >= 1  # scored ground-truth proposals
        assert 0 < info["mask"]["area"] < 1
    assert _row(tmp_path / "run")["mask"] == "aligned"


@pytest.mark.parametrize(
    "method, dataset",
    [*itertools.product(["semani_trans", "semani_diff", "blended_ldm", "predictions"],
                        ["cub", "oxford", "coco"]),
     *itertools.product(["semani_trans_shapes", "semani_diff_shapes", "blended_ldm_shapes",
                         "predictions"], ["shapes"])],
)  # fmt: skip
def test_missing_weights_are_one_line_naming_the_file_and_its_maker(
    tmp_path: Path, method: str, dataset: str
) -> None:
    extra = []
    if method == "predictions":
        (tmp_path / "preds").mkdir()
        extra = ["method_name=ManiGAN", f"table1.predictions_dir={tmp_path / 'preds'}"]
    cfg = compose("eval", ["protocol=table1", f"method={method}", f"data={dataset}",
                           f"paths.root_dir={tmp_path}",
                           f"data.root={tmp_path / 'data'}", "extras.print_config=false",
                           *extra], tmp_path)  # fmt: skip
    assert cfg.protocol == "table1"
    with pytest.raises(SystemExit) as err:
        eval_main(cfg)
    msg = str(err.value)
    assert msg.startswith("error: ") and "\n" not in msg
    if method == "predictions":  # no weights of its own: the data (then the metrics) first
        assert str(tmp_path / "data") in msg
    else:
        assert str(tmp_path / "pretrained") in msg
        makers = ("experiment=", "http", "github.com", "huggingface", "download_weights.py --only")
        assert any(m in msg for m in makers), msg


@pytest.mark.parametrize("composite", [True, False])
def test_one_background_switch_for_every_method(
    tmp_path: Path, shapes_root: Path, classifier: Path, inpaint_folder: Path, composite: bool
) -> None:
    """table1.composite pastes the input back outside the mask for Blended LDM too (false:
    its VAE's reconstruction there), the same treatment as SeMani-Diff's."""
    from semani.data.shapes import ShapesWorldDataset
    from semani.evaluation.table1 import as_uint8

    cfg = compose(
        "eval",
        ["protocol=table1", "method=blended_ldm_shapes", "data=shapes",
         f"editor.source={inpaint_folder}", "editor.steps=2", "editor.guidance_scale=1.0",
         "table1.mask=ground_truth", f"table1.composite={composite}", "table1.feather=0",
         *_overrides(shapes_root, classifier, "table1.max_images=2", "table1.l2=false",
                     "metrics.is_splits=1")],
        tmp_path,
    )  # fmt: skip
    eval_main(cfg)
    ds = ShapesWorldDataset(shapes_root, "test", image_size=64, context_length=40)
    with (tmp_path / "plan.csv").open() as f:
        plan = list(csv.DictReader(f))
    for p in plan:
        image = as_uint8(ds[int(p["index"])]["image"])
        out = np.asarray(Image.open(tmp_path / "images" / f"{p['key']}.png"))
        mask = np.asarray(Image.open(tmp_path / "images" / "masks" / f"{p['key']}.png")) > 127
        assert np.array_equal(out[~mask], image[~mask]) == composite
