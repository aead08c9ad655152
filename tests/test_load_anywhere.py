"""Checkpoints that load anywhere: `semani.load_model` (every model kind, the class a checkpoint
names, no import circle), init_ckpt only at the start of a fit, frozen-part fingerprints and moved
frozen files, absolute config paths, and the test step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

import semani
from semani.models.semani_trans import FrozenWeightsMismatchError, SemaniTransModule
from semani.models.vqgan import VQGANModule
from semani.utils.checkpoint import CheckpointMismatchError, load_checkpoint, state_fingerprint
from tests.conftest import REPO_ROOT, compose
from tests.test_semani_trans_module import VQ, _loader, _trainer, make_module


@pytest.fixture(scope="module")
def batch(shapes_root: Path) -> dict[str, Any]:
    from semani.data.base import collate_samples
    from semani.data.shapes import ShapesWorldDataset

    ds = ShapesWorldDataset(shapes_root, "train", image_size=64, context_length=32,
                            deterministic=True)  # fmt: skip
    return collate_samples([ds[i] for i in range(4)])


def _save_vqgan(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    vq = VQGANModule(**VQ)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()}, path)
    return path


def _fit_and_save(model: pl.LightningModule, batch, tmp_path: Path, name: str, steps: int = 1):
    trainer = _trainer(tmp_path, steps)
    trainer.fit(model, _loader(batch, steps))
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return path


def _assert_same_gpt(a: SemaniTransModule, b: SemaniTransModule) -> None:
    for k, v in a.gpt.state_dict().items():
        torch.testing.assert_close(b.gpt.state_dict()[k], v, msg=k)


class GptAtTrainStart(pl.Callback):
    """Copies the transformer weights when training starts (after on_fit_start)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.gpt.state_dict().items()}


def test_step2_checkpoint_loads_without_step1_file_and_with_a_moved_vqgan(
    batch: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vq_file = _save_vqgan(tmp_path / "pretrained" / "vqgan.ckpt", seed=1)
    vq_spec = {"ckpt_path": str(vq_file)}
    step1 = make_module(vqgan=vq_spec, lambda_sem=0.0, clip=None, vg_prob=0.0)
    step1_ckpt = _fit_and_save(step1, batch, tmp_path, "step1.ckpt")

    step2 = make_module(vqgan=vq_spec, lambda_sem=0.0, clip=None, init_ckpt=str(step1_ckpt))
    _assert_differs = any(
        not torch.equal(v, step2.gpt.state_dict()[k]) for k, v in step1.gpt.state_dict().items()
    )
    assert _assert_differs, "a fresh module must not already hold the step-1 weights"
    seen = GptAtTrainStart()
    trainer = _trainer(tmp_path, 1, callbacks=[seen])
    trainer.fit(step2, _loader(batch, 1))
    for k, v in step1.gpt.state_dict().items():  # fitting started from step 1's transformer
        torch.testing.assert_close(seen.state[k], v, msg=k)
    step2_ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(step2_ckpt)
    assert load_checkpoint(step2_ckpt)["hyper_parameters"]["init_ckpt"] == str(step1_ckpt)

    step1_ckpt.unlink()  # the step-1 file is gone: loading must not need it
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = semani.load_model(step2_ckpt)
    assert isinstance(loaded, SemaniTransModule) and not loaded.training
    _assert_same_gpt(step2, loaded)

    moved = tmp_path / "moved" / "vqgan.ckpt"
    moved.parent.mkdir()
    shutil.move(vq_file, moved)
    with pytest.raises(FileNotFoundError, match="vqgan.ckpt"):
        semani.load_model(step2_ckpt)
    loaded = semani.load_model(step2_ckpt, vqgan={"ckpt_path": str(moved)})
    _assert_same_gpt(step2, loaded)
    assert loaded.hparams.vqgan["ckpt_path"] == str(moved)
    via_lightning = SemaniTransModule.load_from_checkpoint(
        step2_ckpt, vqgan={"ckpt_path": str(moved)}
    )
    _assert_same_gpt(step2, via_lightning)


def test_resume_does_not_read_init_ckpt(batch: dict[str, Any], tmp_path: Path) -> None:
    """Resuming step 2 from its own checkpoint works after the step-1 file is deleted."""
    step1_ckpt = _fit_and_save(make_module(lambda_sem=0.0, clip=None), batch, tmp_path, "s1.ckpt")
    step2 = make_module(lambda_sem=0.0, clip=None, init_ckpt=str(step1_ckpt))
    step2_ckpt = _fit_and_save(step2, batch, tmp_path, "s2.ckpt")
    step1_ckpt.unlink()
    resumed = make_module(lambda_sem=0.0, clip=None, init_ckpt=str(step1_ckpt))
    trainer = _trainer(tmp_path, 2)
    trainer.fit(resumed, _loader(batch, 2), ckpt_path=str(step2_ckpt))
    assert trainer.global_step == 2


def test_init_ckpt_errors_name_the_problem(batch: dict[str, Any], tmp_path: Path) -> None:
    first = make_module(lambda_sem=0.0, clip=None)
    vq_only = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {"encoder.w": torch.zeros(1)}}, vq_only)
    with pytest.raises(CheckpointMismatchError, match="no 'gpt.\\*' weights"):
        first.init_transformer_from(str(vq_only))
    other = make_module(lambda_sem=0.0, clip=None, gpt={**first.hparams.gpt, "n_embd": 32})
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {f"gpt.{k}": v for k, v in other.gpt.state_dict().items()}}, wrong)
    with pytest.raises(CheckpointMismatchError, match="shape"):
        first.init_transformer_from(str(wrong))
    missing = make_module(lambda_sem=0.0, clip=None, init_ckpt=str(tmp_path / "gone.ckpt"))
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        _trainer(tmp_path, 1).fit(missing, _loader(batch, 1))


def test_a_different_frozen_vqgan_is_refused(batch: dict[str, Any], tmp_path: Path) -> None:
    vq_file = _save_vqgan(tmp_path / "vqgan.ckpt", seed=1)
    model = make_module(vqgan={"ckpt_path": str(vq_file)}, lambda_sem=0.0, clip=None)
    ckpt = _fit_and_save(model, batch, tmp_path, "trans.ckpt")
    saved = load_checkpoint(ckpt)["semani_frozen_fingerprints"]
    assert saved["vqgan."] == {
        "fingerprint": state_fingerprint(model.vqgan),
        "source": str(vq_file),
    }

    retrained = _save_vqgan(tmp_path / "other" / "vqgan.ckpt", seed=2)  # same shapes
    with pytest.raises(FrozenWeightsMismatchError) as err:
        semani.load_model(ckpt, vqgan={"ckpt_path": str(retrained)})
    assert str(vq_file) in str(err.value) and str(retrained) in str(err.value)
    _save_vqgan(vq_file, seed=3)  # re-running stage 1 over the same file
    with pytest.raises(FrozenWeightsMismatchError, match="accept_frozen_mismatch"):
        semani.load_model(ckpt)
    with pytest.raises(FrozenWeightsMismatchError):  # a resume is checked too
        _trainer(tmp_path, 2).fit(
            make_module(vqgan={"ckpt_path": str(vq_file)}, lambda_sem=0.0, clip=None),
            _loader(batch, 2), ckpt_path=str(ckpt),
        )  # fmt: skip
    accepted = semani.load_model(ckpt, accept_frozen_mismatch=True)
    _assert_same_gpt(model, accepted)


def test_state_fingerprint_is_bitwise() -> None:
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_fingerprint(a) == state_fingerprint(b)
    with torch.no_grad():
        b.bias[0] = torch.nextafter(b.bias[0], torch.tensor(1.0))
    assert state_fingerprint(a) != state_fingerprint(b)
    assert state_fingerprint(a.to(torch.bfloat16)) != state_fingerprint(b.to(torch.float32))


def test_load_model_reads_a_vqgan_and_refuses_what_is_not_ours(tmp_path: Path) -> None:
    vq_file = _save_vqgan(tmp_path / "vqgan.ckpt", seed=1)
    vq = semani.load_model(vq_file)
    assert isinstance(vq, VQGANModule) and not vq.training and vq.loss is None
    with pytest.raises(TypeError, match="unknown VQGAN overrides"):
        semani.load_model(vq_file, gpt={})
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "epoch": 3}, other)
    with pytest.raises(CheckpointMismatchError, match="not a checkpoint of ours"):
        semani.load_model(other)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        semani.load_model(tmp_path / "nowhere.ckpt")


def _tiny_model(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> pl.LightningModule:
    """A tiny random model of each kind `load_model` opens (as each model's own tests build it)."""
    torch.manual_seed(0)
    if kind == "vqgan":
        return VQGANModule(**VQ)
    if kind == "semani_trans":
        return make_module(clip=None, lambda_sem=0.0)
    if kind == "semani_diff":
        from semani.models.semani_diff import SemaniDiffModule

        tok_dir = request.getfixturevalue("tok_dir")
        return SemaniDiffModule(tiny={"seed": 0, "tokenizer_folder": str(tok_dir)})
    if kind == "mask_prompt":
        import open_clip

        from semani.models.mask_prompt_module import MaskPromptTuningModule

        clip_file = tmp_path / "open_clip_model.pt"
        torch.save(open_clip.create_model("semani-shapes-ViT").state_dict(), clip_file)
        return MaskPromptTuningModule(["circle", "square"], "semani-shapes-ViT", str(clip_file))
    if kind == "clip":
        from semani.models.clip_module import ClipTrainModule

        return ClipTrainModule("semani-shapes-ViT", loss="clip")
    if kind == "vae":
        from semani.models.vae_module import VAEModule

        tiny = {"seed": 0, "channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_size": 8}
        return VAEModule(tiny=tiny)
    if kind == "classifier":
        from semani.models.classifier_module import ClassifierModule

        return ClassifierModule(width=4)
    raise ValueError(kind)


def _save(model: pl.LightningModule, path: Path) -> Path:
    """What a Lightning checkpoint holds for `load_model`: hparams, weights, the class's own
    entries."""
    ckpt = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


KINDS = ["vqgan", "semani_trans", "semani_diff", "mask_prompt", "clip", "vae", "classifier"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_opens_every_model_kind(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = _tiny_model(kind, request, tmp_path)
    path = _save(model, tmp_path / f"{kind}.ckpt")
    loaded = semani.load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_load_model_opens_an_official_taming_vqgan_with_its_config(tmp_path: Path) -> None:
    from tests.test_vqgan import TINY_DDCONFIG, TamingVQ, taming_yaml

    torch.manual_seed(0)
    ref = TamingVQ(TINY_DDCONFIG, n_embed=16, embed_dim=4)
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, tmp_path / "last.ckpt")
    config = taming_yaml(tmp_path / "model.yaml", TINY_DDCONFIG, n_embed=16, embed_dim=4)
    vq = semani.load_model(tmp_path / "last.ckpt", config=config)
    assert isinstance(vq, VQGANModule) and not vq.training
    for k, v in ref.state_dict().items():
        assert torch.equal(vq.state_dict()[k], v), k
    with pytest.raises(KeyError, match="config=<its model.yaml>"):  # a taming file needs config
        semani.load_model(tmp_path / "last.ckpt")


@pytest.mark.parametrize(
    "name",
    [
        "collections.OrderedDict",  # a class, but not ours
        "torch.nn.Linear",
        "semani.models.no_such_module.Model",
        "semani.models.vqgan.NoSuchModule",
        "semani.modules.gpt.SemaniGPT",  # ours, but no from_checkpoint_dict
        "semani.loading.load_model",  # not a class
        "semani..models.vqgan.VQGANModule",
    ],
)
def test_load_model_refuses_a_class_it_cannot_open(name: str, tmp_path: Path) -> None:
    path = tmp_path / "named.ckpt"
    torch.save({"semani_model": name, "hyper_parameters": {}, "state_dict": {}}, path)
    with pytest.raises(CheckpointMismatchError, match="load_model cannot open") as err:
        semani.load_model(path)
    assert str(path) in str(err.value) and repr(name) in str(err.value)


def test_models_import_without_the_loader() -> None:
    """No import circle: a model module imports first, in a fresh interpreter, and does not pull
    in `semani.loading` (which imports a model only when a checkpoint names it)."""
    code = (
        "import sys\n"
        "import semani.models.semani_trans\n"
        "assert 'semani.loading' not in sys.modules, 'semani_trans imported semani.loading'\n"
        "import semani.models.clip_module, semani.models.entityseg_module\n"
        "import semani.models.mask_prompt_module, semani.models.semani_diff\n"
        "import semani.models.vae_module, semani.models.classifier_module\n"
        "assert 'semani.loading' not in sys.modules, 'a model imported semani.loading'\n"
        "bad = sorted(m for m in sys.modules if m.startswith('semani.alignment'))\n"
        "assert not bad, f'the models imported {bad}'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_load_overrides_are_checked(batch: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _fit_and_save(make_module(lambda_sem=0.0, clip=None), batch, tmp_path, "t.ckpt")
    with pytest.raises(TypeError, match="unknown SemaniTransModule overrides \\['lamda_img'\\]"):
        semani.load_model(ckpt, lamda_img=2.0)
    loaded = semani.load_model(ckpt, sampling={"temperature": 0.5})
    assert loaded.sampling["temperature"] == 0.5


def test_config_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose("train", ["experiment=semani_trans_shapes"])
    assert Path(cfg.paths.root_dir) == tmp_path.resolve()
    assert Path(cfg.model.vqgan.ckpt_path).is_absolute()
    monkeypatch.setenv("SEMANI_ROOT", "~/somewhere")
    cfg = compose("train", ["experiment=semani_trans_shapes"])
    assert cfg.paths.root_dir == str(Path("~/somewhere").expanduser().resolve())


def test_eval_task_runs_the_semani_trans_test_step(shapes_root: Path, tmp_path: Path) -> None:
    from semani.tasks.eval import evaluate
    from semani.tasks.train import train

    common = [
        "experiment=semani_trans_shapes", f"data.root={shapes_root}", "data.batch_size=2",
        "data.num_workers=0", "model.vqgan.ckpt_path=null", "extras.print_config=false",
    ]  # fmt: skip
    train(compose("train", [*common, "trainer.max_steps=1", "trainer.limit_val_batches=0"],
                  tmp_path / "train"))  # fmt: skip
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    metrics, _ = evaluate(
        compose(
            "eval",
            [*common, f"ckpt_path={ckpt}", "trainer.limit_test_batches=2"],
            tmp_path / "eval",
        )  # fmt: skip
    )
    for key in ("test/loss", "test/loss_txt", "test/loss_img", "test/loss_img_guided",
                "test/loss_vg_guided"):  # fmt: skip
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["test/loss_img"] > 0 and metrics["test/loss_vg_guided"] > 0


def test_eval_py_without_ckpt_path_says_what_to_pass(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "eval.py"), f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ckpt_path=" in lines[0], proc.stderr
