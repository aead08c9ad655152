"""The alignment study: selection accuracy / mIoU / chance on cases whose answer is known, and
`eval.py protocol=alignment data=shapes` end to end on random weights."""

from __future__ import annotations

import csv
from pathlib import Path

import open_clip
import pytest
import torch

from semani.alignment.study import markdown_table, run_study, summarize
from semani.alignment.types import EntityProposals
from semani.tasks.eval import main as eval_main
from tests.conftest import compose


def _sample(index: int = 0) -> dict:
    """A 4x6 image with three entities: circle (left), square (middle), star (right)."""
    masks = torch.zeros(3, 4, 6)
    masks[0, :, 0:2] = 1
    masks[1, :, 2:4] = 1
    masks[2, :, 4:6] = 1
    return {"image": torch.zeros(3, 4, 6), "entity_masks": masks,
            "entity_names": ["circle", "square", "star"], "index": index}  # fmt: skip


def _gt(image, sample) -> EntityProposals:
    m = sample["entity_masks"] > 0.5
    return EntityProposals(m, torch.ones(len(m)), list(sample["entity_names"]))


def _halves(image, sample) -> EntityProposals:
    """A learned segmenter that merges circle+square (IoU 0.5 with each) and finds the star."""
    m = torch.zeros(2, 4, 6, dtype=torch.bool)
    m[0, :, 0:4] = True
    m[1, :, 4:6] = True
    return EntityProposals(m, torch.ones(2))


class Oracle:
    """Scores 1 for the proposal covering the named entity's left column (knows the answer)."""

    selection, threshold = "argmax", None
    columns = {"circle": 0, "square": 2, "star": 4, "small red circle": 0,
               "big blue square": 2, "green star": 4}  # fmt: skip

    def __call__(self, image, proposals, word):
        return proposals.masks[:, 0, self.columns[word]].float()


class First:
    """Always prefers proposal 0; proposal 2 cannot be scored (NaN)."""

    selection, threshold = "argmax", None

    def __call__(self, image, proposals, word):
        s = torch.linspace(1, 0, len(proposals))
        if len(proposals) > 2:
            s[2] = float("nan")
        return s


def test_accuracy_chance_and_oracle_on_known_answers() -> None:
    data = [_sample(0), _sample(1)]
    records = run_study(data, {"gt": _gt, "halves": _halves},
                        {"oracle": Oracle(), "first": First()})  # fmt: skip
    rows = {(r["segmenter"], r["scorer"]): r for r in summarize(records)}
    assert all(r["cases"] == 6 for r in rows.values())  # 2 images x 3 words
    assert rows["gt", "oracle"]["correct"] == 1.0 and rows["gt", "oracle"]["iou"] == 1.0
    # "first" always picks the circle: right for 1 of 3 words; star's proposal is not scored
    assert rows["gt", "first"]["correct"] == pytest.approx(1 / 3)
    # chance among the 2 eligible: circle 1/2, square 1/2, star 0/2 (its proposal is NaN)
    assert rows["gt", "first"]["chance_correct"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert rows["gt", "oracle"]["chance_correct"] == pytest.approx(1 / 3)
    # merged proposal: IoU 0.5 with circle and with square -> right for both (>= 0.5)
    assert rows["halves", "oracle"]["correct"] == 1.0
    assert rows["halves", "oracle"]["iou"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert rows["halves", "oracle"]["oracle_correct"] == 1.0
    per_word = summarize(records, by_word=True)
    star = next(r for r in per_word if r["segmenter"] == "gt" and r["scorer"] == "first"
                and r["word"] == "star")  # fmt: skip
    assert star["correct"] == 0.0 and star["cases"] == 2
    table = markdown_table(summarize(records), ["segmenter", "scorer", "correct"])
    assert "| gt | oracle | 1.000 |" in table


def test_descriptions_and_min_candidates() -> None:
    def describe(i):
        return ["small red circle", "big blue square", "green star"]

    single = dict(_sample(), entity_masks=_sample()["entity_masks"][:1], entity_names=["circle"])
    records = run_study([_sample(), single], {"gt": _gt}, {"oracle": Oracle()},
                        prompt_kinds=["description"], describe=describe,
                        min_candidates=2)  # fmt: skip
    assert {r.prompt for r in records} == {"small red circle", "big blue square", "green star"}
    assert {r.image for r in records} == {0}  # the one-entity image is left out
    with pytest.raises(ValueError, match="descriptions"):
        run_study([_sample()], {"gt": _gt}, {"o": Oracle()}, prompt_kinds=["description"])
    with pytest.raises(ValueError, match="unknown prompt kinds"):
        run_study([_sample()], {"gt": _gt}, {"o": Oracle()}, prompt_kinds=["caption"])


def test_eval_alignment_shapes_writes_its_tables(shapes_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("semani-shapes-ViT").state_dict(), clip)
    cfg = compose(
        "eval",
        ["protocol=alignment", "data=shapes", f"data.root={shapes_root}", f"study.clip={clip}",
         "study.entityseg=null", "study.max_images=3", "extras.print_config=false"],
        tmp_path,
    )  # fmt: skip
    metrics = eval_main(cfg)
    with (tmp_path / "alignment_study.csv").open() as f:
        rows = list(csv.DictReader(f))
    scorers = {r["scorer"] for r in rows}
    assert scorers == {"token_wise", "masked_crop_clip", "mask_prompt_untuned",
                       "token_wise_untrained", "masked_crop_clip_untrained"}  # fmt: skip
    assert {r["segmenter"] for r in rows} == {"ground_truth"}  # entityseg disabled
    assert {r["prompt_kind"] for r in rows} == {"name", "description"}
    for r in rows:
        assert 0.0 <= float(r["correct"]) <= 1.0 and float(r["oracle_correct"]) == 1.0
        key = f"{r['segmenter']}/{r['scorer']}/{r['prompt_kind']}"
        assert metrics[f"{key}/accuracy"] == pytest.approx(float(r["correct"]))
    md = (tmp_path / "alignment_study.md").read_text()
    assert "| ground_truth | token_wise | name |" in md and "## Per prompt word" in md
    assert (tmp_path / "alignment_cases.csv").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_segmenter_says_how_to_leave_it_out(shapes_root: Path, tmp_path: Path) -> None:
    cfg = compose(
        "eval",
        ["protocol=alignment", "data=shapes", f"data.root={shapes_root}", "study.clip=null",
         f"study.entityseg={tmp_path / 'absent'}", "extras.print_config=false"],
        tmp_path,
    )  # fmt: skip
    with pytest.raises(SystemExit, match="study.segmenters.entityseg_shapes=null"):
        eval_main(cfg)
