"""The pretrained weights the paper configs read: where each comes from, where it goes, and the
manifest that `scripts/download_weights.py` keeps of what it wrote.

`REGISTRY` holds one `WeightFile` per download: a short name, what it is, its source (URLs, a
Hugging Face repository, or the manual steps of a release that no script can fetch, e.g. a
Google Drive file) and its target under the pretrained folder (`paths.pretrained_dir`,
`pretrained/` by default), in exactly the layout the configs read.

`pretrained/MANIFEST.json` records every file written, by its path relative to that folder:
`{"files": {"clip/RN50.pt": {"entry", "source", "size", "sha256", "recorded"}}}`. `verify`
compares a file or a folder with it (size, and sha256 unless `quick`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from semani.utils.atomic import write_text

__all__ = [
    "MANIFEST",
    "REGISTRY",
    "WeightFile",
    "file_digest",
    "find_entry",
    "load_manifest",
    "record_files",
    "select_repo_files",
    "verify",
]

MANIFEST = "MANIFEST.json"
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_HEIBOX_VQGAN = "https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/files/?p="
_STACKGAN_DRIVE = "https://drive.google.com/open?id=0B3y_msrWZaXLMzNMNWhWdW0zVWs"


@dataclass(frozen=True)
class WeightFile:
    """One download.

    name: the short name (`--only <name>`). what: one line on what it is. target: the file or
    folder it becomes, relative to the pretrained folder. urls: (file relative to the pretrained
    folder, URL) pairs. checksums: file -> (algorithm, hex digest or its prefix) the source
    publishes, checked before a download is renamed. repo_id: a Hugging Face repository
    downloaded into `target` (`select_repo_files` picks its files). manual: the steps when no
    script can fetch it (`{path}`: the target; a new line per step). page: where several URLs
    come from.
    """

    name: str
    what: str
    target: str
    urls: tuple[tuple[str, str], ...] = ()
    checksums: dict[str, tuple[str, str]] = field(default_factory=dict)
    repo_id: str | None = None
    manual: str | None = None
    page: str | None = None

    @property
    def kind(self) -> str:
        return "hub" if self.repo_id else "manual" if self.manual else "url"

    @property
    def source(self) -> str:
        """The source in a few words (for `--list` and the manifest)."""
        if self.repo_id:
            return f"https://huggingface.co/{self.repo_id}"
        if self.page:
            return self.page
        if self.urls:
            return self.urls[0][1] if len(self.urls) == 1 else f"{len(self.urls)} URLs"
        return "manual: " + (self.manual or "").split("\n")[0]


def _openai(name: str, sha256: str) -> WeightFile:
    """OpenAI's CLIP release file `clip/<name>.pt` (the URLs of open_clip's pretrained.py; the
    folder in the URL is the file's sha256)."""
    target = f"clip/{name}.pt"
    return WeightFile(
        name=f"clip-{name.lower().replace('-b-', '-b')}",
        what=f"OpenAI CLIP {name} (TorchScript release)",
        target=target,
        urls=((target, f"{_OPENAI}/{sha256}/{name}.pt"),),
        checksums={target: ("sha256", sha256)},
    )


def _stackgan(kind: str, dataset: str, classes: int) -> WeightFile:
    """StackGAN's fine-tuned Inception-v3 (a TF checkpoint on Google Drive), converted."""
    return WeightFile(
        name=f"inception-{kind}",
        what=f"StackGAN's fine-tuned {kind} Inception-v3, converted (IS on {dataset})",
        target=f"inception/stackgan_{kind}_inception_v3.pth",
        manual=(
            "StackGAN's inception models (hanzhanggit/StackGAN-inception-model): "
            f"{_STACKGAN_DRIVE}\nunpack it; pip install -e '.[tf]'; python "
            "scripts/convert_stackgan_inception.py --ckpt "
            f"inception_finetuned_models/{kind}_valid299/model.ckpt --out {{path}} "
            f"--num-classes {classes}"
        ),
    )


def _hub(name: str, repo_id: str, what: str) -> WeightFile:
    return WeightFile(name=name, what=what, target=repo_id.split("/")[1], repo_id=repo_id)


REGISTRY: tuple[WeightFile, ...] = (
    WeightFile(
        name="vqgan-imagenet-f16-1024",
        what="taming-transformers' ImageNet VQGAN, f=16, 1024 codes (SeMani-Trans)",
        target="vqgan_imagenet_f16_1024",
        page="https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/ (taming's README)",
        urls=(
            (
                "vqgan_imagenet_f16_1024/ckpts/last.ckpt",
                _HEIBOX_VQGAN + "%2Fckpts%2Flast.ckpt&dl=1",
            ),
            (
                "vqgan_imagenet_f16_1024/configs/model.yaml",
                _HEIBOX_VQGAN + "%2Fconfigs%2Fmodel.yaml&dl=1",
            ),
        ),
    ),
    _openai("ViT-B-32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    _openai("ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    _openai("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    _hub(
        "sd2-inpainting",
        "stabilityai/stable-diffusion-2-inpainting",
        "Stable Diffusion 2 inpainting, diffusers layout (SeMani-Diff)",
    ),
    _hub(
        "sd2-base",
        "stabilityai/stable-diffusion-2-base",
        "Stable Diffusion 2 base, diffusers layout (Blended Latent Diffusion)",
    ),
    _hub(
        "mask2former",
        "facebook/mask2former-swin-large-coco-panoptic",
        "Mask2Former Swin-L COCO panoptic (alignment/segmenter=mask2former)",
    ),
    _hub("sam-vit-base", "facebook/sam-vit-base", "SAM ViT-B (alignment/segmenter=sam)"),
    _hub(
        "grounding-dino-tiny",
        "IDEA-Research/grounding-dino-tiny",
        "Grounding DINO tiny (alignment/segmenter=grounding_sam)",
    ),
    WeightFile(
        name="ovseg",
        what="OVSeg Swin-B + CLIP ViT-L/14, mask-prompt tuned (SeMani-Diff's segmenter/scorer)",
        target="ovseg/ovseg_swinbase_vitL14_ft_mpt.pth",
        manual=(
            "OVSeg's Google Drive release (facebookresearch/ov-seg, GETTING_STARTED.md; md5 "
            "starts with 526080): "
            "https://drive.google.com/file/d/1cn-ohxgXDrDfkzC1QdO-fi8IjbjXmgKy/view\n"
            "save it as {path} (e.g. `pip install gdown && gdown "
            "1cn-ohxgXDrDfkzC1QdO-fi8IjbjXmgKy -O {path}`)"
        ),
    ),
    WeightFile(
        name="entityseg",
        what="EntitySeg v1 Swin-L-W7 3x (SeMani-Trans' segmenter; needs detectron2)",
        target="entityseg/entity_swin_lw7_3x.pth",
        manual=(
            "the Swin-L-W7 3x model of github.com/qqlu/Entity (Entity/README.md, Google Drive): "
            "https://drive.google.com/file/d/1xPWkf0WiF14h7wM7nuapOAEIqZsStGdm/view\n"
            "save it as {path}; the segmenter also needs detectron2 and that code "
            "(semani/alignment/segmenters/entityseg.py, INSTALL)"
        ),
    ),
    WeightFile(
        name="inception-coco",
        what="TF ImageNet Inception-v3 as torch-fidelity ships it (IS on COCO)",
        target="inception/weights-inception-2015-12-05-6726825d.pth",
        urls=(
            (
                "inception/weights-inception-2015-12-05-6726825d.pth",
                "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth",
            ),
        ),
    ),
    _stackgan("birds", "CUB", 51),
    _stackgan("flowers", "Oxford-102", 21),
    WeightFile(
        name="lpips-vgg",
        what="LPIPS VGG weights of taming-transformers (model=vqgan_f16_1024 training)",
        target="lpips/vgg.pth",
        urls=(("lpips/vgg.pth", "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"),),
        checksums={"lpips/vgg.pth": ("md5", "d507d7349b931f0638a25a48a722f98a")},
    ),
)


def find_entry(root: str | os.PathLike, path: str | os.PathLike) -> WeightFile | None:
    """The registry entry whose target is `path` or holds it (under `root`), else None."""
    path = Path(path).expanduser().absolute()
    for entry in REGISTRY:
        target = (Path(root) / entry.target).absolute()
        if path == target or target in path.parents:
            return entry
    return None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 16 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def load_manifest(root: str | os.PathLike) -> dict[str, dict]:
    """`{relative path: {"entry", "source", "size", "sha256", "recorded"}}` of
    `<root>/MANIFEST.json` ({} when there is none)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("files", {}))


def record_files(root: str | os.PathLike, entry: str, source: str, files: Iterable[Path]) -> None:
    """Add `files` (under `root`) to the manifest with their size and sha256, replacing rows of
    the same paths; written through a temporary name."""
    root = Path(root)
    rows = load_manifest(root)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for f in files:
        rel = PurePosixPath(Path(f).relative_to(root)).as_posix()
        rows[rel] = {
            "entry": entry,
            "source": source,
            "size": Path(f).stat().st_size,
            "sha256": file_digest(f),
            "recorded": stamp,
        }
    text = json.dumps({"version": 1, "files": dict(sorted(rows.items()))}, indent=2) + "\n"
    write_text(root / MANIFEST, text)


def verify(
    root: str | os.PathLike, path: str | os.PathLike, manifest: dict[str, dict], quick: bool
) -> tuple[str, str]:
    """The state of a file or folder the configs read: ("ok" | "unverified" | "missing" |
    "corrupt", detail). "unverified": present, but no manifest row covers it."""
    root, path = Path(root).absolute(), Path(path).expanduser().absolute()
    try:
        rel = PurePosixPath(path.relative_to(root)).as_posix()
    except ValueError:  # outside the pretrained folder: only whether it exists
        found = path.exists()
        return ("unverified", "outside the pretrained folder") if found else ("missing", "")
    rows = {k: v for k, v in manifest.items() if k == rel or k.startswith(rel + "/")}
    if not path.exists():
        return "missing", ""
    if not rows:
        return "unverified", "present, not in the manifest"
    for name, row in sorted(rows.items()):
        f = root / name
        if not f.is_file():
            return "corrupt", f"{name} is missing (recorded in the manifest)"
        size = f.stat().st_size
        if size != row["size"]:
            return "corrupt", f"{name}: {size} bytes, the manifest says {row['size']}"
        if not quick and file_digest(f) != row["sha256"]:
            return "corrupt", f"{name}: sha256 differs from the manifest's"
    return "ok", f"{len(rows)} file{'s' if len(rows) > 1 else ''} verified" + (
        " (sizes)" if quick else ""
    )


def select_repo_files(files: Sequence[str]) -> list[str]:
    """The files of a hub repository that its library reads from a downloaded folder: configs,
    tokenizer files, and one weight format per folder (safetensors over .bin), without fp16 /
    EMA / ONNX / Flax / TF variants; in a diffusers repository (`model_index.json`) only the
    component folders' weights (not the single-file checkpoints at the root)."""
    diffusers = "model_index.json" in files
    skip = ("fp16", "non_ema", "ema-only", "onnx", "flax", "openvino", ".msgpack", ".h5")
    weights = {f for f in files if f.endswith((".safetensors", ".bin", ".pth", ".pt", ".ckpt"))}
    safetensor_dirs = {os.path.dirname(f) for f in weights if f.endswith(".safetensors")}
    keep = []
    for f in files:
        folder, name = os.path.split(f)
        if any(s in name for s in skip) or name.startswith("."):
            continue
        if f in weights:
            if diffusers and not folder:
                continue  # the root .ckpt / .safetensors: the single-file release
            if not f.endswith((".safetensors", ".bin")):
                continue
            if f.endswith(".bin") and folder in safetensor_dirs:
                continue
            keep.append(f)
        elif name.endswith((".json", ".txt", ".model", ".yaml")):
            keep.append(f)
    return sorted(keep)
