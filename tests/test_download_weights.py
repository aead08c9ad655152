"""`scripts/download_weights.py`: the registry, `--check` on a tree the test writes, and the
downloads through fake fetchers (temporary name, then rename; the manifest). No network."""

from __future__ import annotations

import hashlib
import json
import urllib.error
from pathlib import Path

import pytest

from semani.utils.weight_files import (
    MANIFEST,
    REGISTRY,
    WeightFile,
    find_entry,
    load_manifest,
    record_files,
    select_repo_files,
)
from tests.conftest import load_script

dw = load_script("download_weights")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real fetchers must never run here."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test reached the real downloader")

    monkeypatch.setattr(dw, "fetch_url", refuse)
    monkeypatch.setattr(dw, "snapshot", refuse)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- the registry ---------------------------------------------------------------------------------
def test_list_names_every_weight_its_source_and_target(tmp_path: Path, capsys) -> None:
    assert dw.main(["--list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for entry in REGISTRY:
        assert entry.name in out and entry.target in out
    assert "https://huggingface.co/stabilityai/stable-diffusion-2-inpainting" in out
    assert "drive.google.com/file/d/1cn-ohxgXDrDfkzC1QdO-fi8IjbjXmgKy" in out  # OVSeg
    assert "%2Fckpts%2Flast.ckpt" in out and "%2Fconfigs%2Fmodel.yaml" in out  # VQGAN
    assert "[absent]" in out and "[present]" not in out


def test_openai_urls_are_open_clips() -> None:
    import open_clip

    for entry in REGISTRY:
        if entry.name.startswith("clip-"):
            model = Path(entry.target).stem
            assert entry.urls[0][1] == open_clip.pretrained.get_pretrained_url(model, "openai")


def test_every_paper_run_reads_registry_targets_or_trained_files(tmp_path: Path) -> None:
    """The registry's layout is the configs': each local file a paper run reads is a registry
    target (or inside one), or something a training makes."""
    from semani.utils.weights import is_local_path

    for label, config_name, overrides in dw.EXPERIMENTS:
        cfg = dw.compose(config_name, [*overrides, f"paths.pretrained_dir={tmp_path}"])
        for key, value, maker in dw.requirements(cfg):
            if value is None or not is_local_path(value):
                continue
            assert find_entry(tmp_path, value) or "train.py" in maker, (label, key, value)


def test_select_repo_files() -> None:
    sd = [
        "512-inpainting-ema.ckpt", "512-inpainting-ema.safetensors", "README.md",
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/vocab.json",
        "tokenizer/special_tokens_map.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", ".gitattributes",
    ]  # fmt: skip
    assert select_repo_files(sd) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
        "tokenizer/special_tokens_map.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ])  # fmt: skip
    tf = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin",
          "tf_model.h5"]  # fmt: skip
    assert select_repo_files(tf) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert "pytorch_model.bin" in select_repo_files(["config.json", "pytorch_model.bin"])


# -- --check --------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A pretrained folder: SD-2-inpainting and ViT-B-32 recorded in the manifest (ViT-B-32
    then corrupted, same size), the EntitySeg file present but unrecorded, the rest absent."""
    root = tmp_path / "pretrained"
    sd = root / "stable-diffusion-2-inpainting"
    files = [_write(sd / "model_index.json", b"{}"), _write(sd / "unet" / "w.bin", b"unet")]
    record_files(root, "sd2-inpainting", "test", files)
    clip = _write(root / "clip" / "ViT-B-32.pt", b"clip weights")
    record_files(root, "clip-vit-b32", "test", [clip])
    clip.write_bytes(b"CLIP WEIGHTS")  # same size, other bytes
    _write(root / "entityseg" / "entity_swin_lw7_3x.pth", b"entityseg")
    return root


def _check(root: Path, capsys, *extra: str) -> tuple[int, str]:
    code = dw.main(["--check", "--root", str(root), *extra])
    return code, capsys.readouterr().out


def _file_line(out: str, name: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(name + " "))


def test_check_ready_run_exits_0(tree: Path, capsys) -> None:
    code, out = _check(tree, capsys, "--experiments", "experiment=semani_diff_cub")
    assert code == 0
    assert "train.py experiment=semani_diff_cub" in out and "ready" in out
    assert _file_line(out, "stable-diffusion-2-inpainting").split()[1] == "ok"
    assert "1 of 1 runs ready" in out


def test_check_corrupt_and_missing_files(tree: Path, capsys) -> None:
    code, out = _check(tree, capsys, "--experiments", "experiment=semani_trans_cub")
    assert code == 1
    run = next(ln for ln in out.splitlines() if ln.startswith("train.py experiment=semani_trans"))
    assert "lacks 4" in run and "clip/ViT-B-32.pt" in run
    line = _file_line(out, "clip/ViT-B-32.pt")
    assert line.split()[1] == "corrupt" and "sha256 differs" in line
    assert "--only clip-vit-b32" in line
    line = _file_line(out, "vqgan_imagenet_f16_1024/ckpts/last.ckpt")
    assert line.split()[1] == "missing" and "--only vqgan-imagenet-f16-1024" in line
    line = _file_line(out, "semani_trans_cc12m.ckpt")  # made by a training, not downloaded
    assert line.split()[1] == "missing" and "experiment=semani_trans_cc12m_pretrain" in line
    # sizes only: the corruption (same size) is not seen, the missing files still are
    code, out = _check(tree, capsys, "--experiments", "experiment=semani_trans_cub", "--quick")
    assert code == 1 and _file_line(out, "clip/ViT-B-32.pt").split()[1] == "ok"


def test_check_sizes_and_unrecorded_files(tree: Path, capsys) -> None:
    (tree / "stable-diffusion-2-inpainting" / "unet" / "w.bin").write_bytes(b"truncated!")
    code, out = _check(tree, capsys, "--quick", "--experiments",
                       "experiment=semani_diff_cub,manipulate.py method=semani_trans")  # fmt: skip
    assert code == 1
    line = _file_line(out, "stable-diffusion-2-inpainting")
    assert "corrupt" in line and "10 bytes, the manifest says 4" in line
    line = _file_line(out, "entityseg/entity_swin_lw7_3x.pth")  # present, not downloaded here
    assert line.split()[1] == "unverified"
    assert _file_line(out, "editor.ckpt (unset)").split()[2] == "unset"
    assert "0 of 2 runs ready" in out


def test_check_every_paper_run_on_an_empty_folder(tmp_path: Path, capsys) -> None:
    code, out = _check(tmp_path / "pretrained", capsys, "--quick")
    assert code == 1 and "ERROR" not in out
    labels = [label for label, _, _ in dw.EXPERIMENTS]
    assert len(labels) == 9 + 8 + 3 and all(label in out for label in labels)
    assert f"0 of {len(labels)} runs ready" in out


# -- downloads ------------------------------------------------------------------------------------
def test_url_download_goes_through_a_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root, data, calls = tmp_path / "pretrained", b"inception weights", []
    final = root / "inception" / "weights-inception-2015-12-05-6726825d.pth"

    def fake_fetch(url: str, path: Path) -> None:
        assert path.parent == final.parent and path.name.startswith(".")
        assert path.name.endswith(".partial") and not final.exists()
        calls.append(url)
        path.write_bytes(data)

    monkeypatch.setattr(dw, "fetch_url", fake_fetch)
    assert dw.main(["--only", "inception-coco", "--root", str(root)]) == 0
    assert final.read_bytes() == data and [p.name for p in final.parent.iterdir()] == [final.name]
    row = load_manifest(root)["inception/weights-inception-2015-12-05-6726825d.pth"]
    assert row["entry"] == "inception-coco" and row["source"] == calls[0]
    assert row["size"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((root / MANIFEST).read_text())["version"] == 1
    # a second run finds it there and fetches nothing
    assert dw.main(["--only", "inception-coco", "--root", str(root)]) == 0
    assert len(calls) == 1 and "already there" in capsys.readouterr().out


def test_checksum_mismatch_is_not_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = tmp_path / "pretrained"
    monkeypatch.setattr(dw, "fetch_url", lambda url, path: path.write_bytes(b"not RN50"))
    assert dw.main(["--only", "clip-rn50", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "clip-rn50: FAILED" in out and "is not the published" in out
    assert not root.joinpath("clip").exists() and not load_manifest(root)
    # the same bytes with their published digest pass
    digest = hashlib.sha256(b"good").hexdigest()
    entry = WeightFile("x", "a test file", "x/x.pt", urls=(("x/x.pt", "https://example.org/x.pt"),),
                       checksums={"x/x.pt": ("sha256", digest[:10])})  # fmt: skip
    monkeypatch.setattr(dw, "fetch_url", lambda url, path: path.write_bytes(b"good"))
    assert dw.download(entry, root)[0] and (root / "x" / "x.pt").read_bytes() == b"good"


def test_hub_download_goes_through_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pretrained"
    final = root / "sam-vit-base"

    def fake_snapshot(repo_id: str, local_dir: Path) -> None:
        assert repo_id == "facebook/sam-vit-base" and not final.exists()
        assert local_dir.parent == root and local_dir.name == ".sam-vit-base.partial"
        _write(local_dir / "config.json", b"{}")
        _write(local_dir / "model.safetensors", b"sam weights")
        _write(local_dir / ".cache" / "huggingface" / "x.metadata", b"resume info")

    monkeypatch.setattr(dw, "snapshot", fake_snapshot)
    assert dw.main(["--only", "sam-vit-base", "--root", str(root)]) == 0
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "sam-vit-base"]
    rows = load_manifest(root)
    assert set(rows) == {"sam-vit-base/config.json", "sam-vit-base/model.safetensors"}
    assert rows["sam-vit-base/model.safetensors"]["source"].endswith("facebook/sam-vit-base")


def test_all_without_network_fails_once_per_weight_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root, tried = tmp_path / "pretrained", []

    class ConnectError(Exception):  # what httpx raises when the name does not resolve
        pass

    def no_dns(url: str, path: Path) -> None:
        tried.append(url)
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    def no_hub(repo_id: str, local_dir: Path) -> None:
        tried.append(repo_id)
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(dw, "fetch_url", no_dns)
    monkeypatch.setattr(dw, "snapshot", no_hub)
    assert dw.main(["--all", "--root", str(root)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.out.splitlines()
    for entry in REGISTRY:
        mine = [ln for ln in lines if ln.startswith(entry.name + ":")]
        assert len(mine) == 1, entry.name
        assert ("manual step" if entry.manual else "FAILED") in mine[0], mine[0]
    assert "cannot be reached" in captured.out  # a host that failed is not tried again
    assert len(tried) == len({dw._host(e) for e in REGISTRY if not e.manual})
    assert "0 of 15 there" in captured.out
    assert not any(root.rglob("*.partial")) and not any(p.is_file() for p in root.rglob("*"))


def test_unknown_name_is_an_error(tmp_path: Path, capsys) -> None:
    assert dw.main(["--only", "sd3", "--root", str(tmp_path)]) == 2
    assert "unknown sd3" in capsys.readouterr().err


def test_manual_weight_put_in_place_is_recorded(tmp_path: Path, capsys) -> None:
    root = tmp_path / "pretrained"
    assert dw.main(["--only", "entityseg", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "manual step" in out and "1xPWkf0WiF14h7wM7nuapOAEIqZsStGdm" in out
    assert str(root / "entityseg" / "entity_swin_lw7_3x.pth") in out  # where to save it
    _write(root / "entityseg" / "entity_swin_lw7_3x.pth", b"entityseg weights")
    assert dw.main(["--only", "entityseg", "--root", str(root)]) == 0
    row = load_manifest(root)["entityseg/entity_swin_lw7_3x.pth"]
    assert row["entry"] == "entityseg" and row["size"] == len(b"entityseg weights")
