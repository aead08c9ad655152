"""`StepProgress`: the plain progress lines a driver reads from a stage's log."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from semani.callbacks import step_progress
from semani.callbacks.step_progress import PREFIX, StepProgress, format_seconds


@pytest.mark.parametrize(
    "seconds, text", [(0, "0:00"), (65, "1:05"), (3725, "1:02:05"), (-3, "0:00"), (59.6, "1:00")]
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_lines_every_interval_with_the_eta(monkeypatch, capsys) -> None:
    clock = [100.0]
    monkeypatch.setattr(step_progress.time, "monotonic", lambda: clock[0])
    trainer = SimpleNamespace(max_steps=100, global_step=20)  # resumed at step 20
    cb = StepProgress(every_s=15)
    cb.on_train_start(trainer, None)
    for step, now in ((30, 110.0), (40, 120.0), (50, 130.0)):
        trainer.global_step, clock[0] = step, now
        cb.on_train_batch_end(trainer)
    lines = capsys.readouterr().out.splitlines()
    # 110 s: under the interval; 120 s: 20 steps in 20 s, 60 left -> 1:00; 130 s: under again
    assert lines == [f"{PREFIX} step 40/100 (40%), 0:20 elapsed, ETA 1:00"]
    trainer.global_step, clock[0] = 100, 135.0  # the last step always prints
    cb.on_train_batch_end(trainer)
    assert (
        capsys.readouterr().out.strip() == f"{PREFIX} step 100/100 (100%), 0:35 elapsed, ETA 0:00"
    )


def test_no_step_limit_prints_nothing(capsys) -> None:
    trainer = SimpleNamespace(max_steps=-1, global_step=5)
    cb = StepProgress(every_s=0)
    cb.on_train_start(trainer, None)
    cb.on_train_batch_end(trainer)
    assert capsys.readouterr().out == ""
