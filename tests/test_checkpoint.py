"""Safe checkpoint IO: weights-only loading, the legacy-Lightning allow-list, readable errors."""

import argparse
import os
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
from torch import nn

from semani.utils.checkpoint import (
    CheckpointMismatchError,
    LegacyLightningObject,
    UnsafeCheckpointError,
    get_state_dict,
    load_checkpoint,
    load_state_dict_strict,
)


class _RunsShell:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    """Unpickling this creates ``marker`` through builtins.open."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_of_plain_checkpoint(tmp_path: Path) -> None:
    sd = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    torch.save(
        {"state_dict": sd, "global_step": 7, "lr": 1e-4, "names": ["a", "b"]}, tmp_path / "c.pt"
    )
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["global_step"] == 7 and ckpt["names"] == ["a", "b"]
    assert torch.equal(ckpt["state_dict"]["w"], sd["w"])
    assert torch.equal(get_state_dict(ckpt, "c.pt")["b"], sd["b"])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=r"nowhere/last\.ckpt"):
        load_checkpoint(path)


def test_legacy_lightning_checkpoint_loads_with_inert_callback_key(tmp_path: Path) -> None:
    """PL 1.0 (taming) checkpoints key their callback state by the ModelCheckpoint class."""
    sd = {"encoder.w": torch.randn(2, 2)}
    legacy = {
        "epoch": 3,
        "global_step": 100,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {
            ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x"}
        },
        "optimizer_states": [],
        "lr_schedulers": [],
        "state_dict": sd,
    }
    torch.save(legacy, tmp_path / "legacy.ckpt")
    with pytest.raises(Exception, match="ModelCheckpoint"):  # plain weights-only load refuses it
        torch.load(tmp_path / "legacy.ckpt", weights_only=True)
    ckpt = load_checkpoint(tmp_path / "legacy.ckpt")
    (key,) = ckpt["callbacks"]
    assert key is LegacyLightningObject  # the inert stand-in, not Lightning's class
    assert ckpt["callbacks"][key]["best_model_score"].item() == 0.5
    assert torch.equal(ckpt["state_dict"]["encoder.w"], sd["encoder.w"])


@pytest.mark.parametrize(
    ("payload", "global_name"), [(_RunsShell, r"posix\.system"), (_WritesFile, r"io\.open")]
)
def test_code_running_pickle_is_refused_and_never_runs(
    tmp_path: Path, payload, global_name: str
) -> None:
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "evil": payload(marker)}, tmp_path / "evil.ckpt"
    )
    assert not marker.exists()  # saving does not run it
    with pytest.raises(UnsafeCheckpointError, match=global_name) as err:
        load_checkpoint(tmp_path / "evil.ckpt")
    assert "allow-list" in str(err.value) and "evil.ckpt" in str(err.value)
    assert not marker.exists()  # ... and neither did loading


def test_benign_but_unlisted_global_is_refused_by_name(tmp_path: Path) -> None:
    torch.save({"hparams": argparse.Namespace(lr=1.0)}, tmp_path / "ns.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        load_checkpoint(tmp_path / "ns.ckpt")


def test_checkpoint_without_state_dict_lists_its_keys(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "raw.pt")
    ckpt = load_checkpoint(tmp_path / "raw.pt")
    with pytest.raises(KeyError, match=r"no 'state_dict'.*model, step"):
        get_state_dict(ckpt, tmp_path / "raw.pt")


def test_strict_load_error_names_missing_unexpected_and_mis_shaped_keys() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = {
        "0.weight": torch.zeros(3, 4),
        "0.bias": torch.zeros(5),  # wrong shape
        "gpt.wte.weight": torch.zeros(2, 2),  # unexpected
    }  # 1.weight, 1.bias missing
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(net, sd, "other.ckpt", expected="a test net")
    msg = str(err.value)
    assert "other.ckpt" in msg and "a test net" in msg
    assert "2 missing keys: 1.weight, 1.bias" in msg
    assert "1 unexpected keys (prefixes gpt.): gpt.wte.weight" in msg
    assert "0.bias (5,) vs (3,)" in msg
    good = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    load_state_dict_strict(net, good, "good.ckpt", expected="a test net")
    assert torch.all(net[1].weight == 0.5)
