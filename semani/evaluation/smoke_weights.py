"""Random stand-ins for the pretrained weights the paper configs read, at the released sizes.

`make smoke-paper` runs every paper experiment once at real size on CPU, where the released
weights cannot be downloaded. `build_paper_weights(root)` writes each of them into the pretrained
folder `root` (what the configs read as `${paths.pretrained_dir}`): the full architecture of the
released model with seeded random weights, in the released file's own layout, so that the
project's loaders read it exactly as they read the real file. The scores they give mean nothing.

`COMPONENTS` maps the `--only` names of `scripts/download_weights.py`
(`semani.utils.weight_files.REGISTRY`, which gives each target) to a `Component`:

- `vqgan-imagenet-f16-1024`: taming's `ckpts/last.ckpt` ({"state_dict"} of a `VQModel`, the
  loss' LPIPS and discriminator included) and its `configs/model.yaml`;
- `clip-vit-b32`, `clip-vit-b16`, `clip-rn50`: OpenAI's TorchScript release files (fp16,
  QuickGELU), traced from open_clip's architectures;
- `sd2-inpainting`, `sd2-base`: diffusers folders as `StableDiffusion[Inpaint]Pipeline.
  save_pretrained` writes them, in SD-2's shapes (`diffusion_parts.SD2_SHAPES`), with the real
  repositories' PNDM scheduler config;
- `ovseg`: OVSeg's detectron2 checkpoint {"model", "iteration"}: the Swin-B MaskFormer in OVSeg's
  names, the void embedding of its open-vocabulary head, and the mask-prompted CLIP ViT-L/14
  under `clip_adapter.clip_model.*` in OpenAI's layout;
- `mask2former`: a transformers Swin-L COCO-panoptic folder (133 labels, 200 queries);
- `inception-coco`: torch-fidelity's TF Inception-v3 state dict; `inception-birds`,
  `inception-flowers`: StackGAN's Inception-v3 as `scripts/convert_stackgan_inception.py`
  writes it (50 / 20 classes + the background logit, aux logits kept).

A component is built in a hidden staging folder inside `root` and its targets are moved into
place with `os.replace` only when all are written; a component whose files are all present (real
or random) is skipped. `root/SMOKE_WEIGHTS.json` records what was written: `{name: {"files",
"params", "seconds", "seed"}}`. `pretrained/MANIFEST.json` (real downloads) is never touched.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from unittest import mock

import torch
from torch import nn

from semani.utils.atomic import replace_dir, write_text
from semani.utils.weight_files import REGISTRY

__all__ = [
    "COCO_PANOPTIC_LABELS",
    "COMPONENTS",
    "PAPER_VQGAN",
    "RECORD",
    "Component",
    "build_paper_weights",
]

RECORD = "SMOKE_WEIGHTS.json"

# the paper's VQGAN (taming's ImageNet f16-1024): the project's own config of it, whose ddconfig,
# codes, quantizer and loss values are taming's configs/model.yaml
PAPER_VQGAN = Path(__file__).resolve().parents[2] / "configs" / "model" / "vqgan_f16_1024.yaml"
# the loss values the release's yaml gives taming's VQLPIPSWithDiscriminator
_TAMING_LOSS_KEYS = (
    "disc_conditional",
    "disc_in_channels",
    "disc_start",
    "disc_weight",
    "codebook_weight",
)
# facebook/mask2former-swin-large-coco-panoptic: detectron2's COCO panoptic classes, 80 things
# then 53 stuff
COCO_PANOPTIC_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket",
    "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit",
    "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield",
    "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent",
    "towel", "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "window-blind", "window-other", "tree-merged", "fence-merged", "ceiling-merged",
    "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged",
    "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged",
    "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged",
    "rug-merged",
)  # fmt: skip
OVSEG_ITERATION = 120000  # (assumed) the "iteration" entry: ovseg_swinB_vitL_bs32_120k's length
OVSEG_CLIP = "ViT-L-14"  # configs/alignment/segmenter/ovseg.yaml clip_model_name
OVSEG_MASK_PROMPT_DEPTH = 3  # configs/alignment/scorer/mask_prompt.yaml depth


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block under `torch.manual_seed(seed)`; the global RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# builders: (staging folder laid out as the pretrained folder, seed) -> parameters per part


def _paper_vqgan() -> dict:
    """The paper VQGAN's config as plain values (`PAPER_VQGAN`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(PAPER_VQGAN))


def _taming_loss(loss: dict) -> nn.Module:
    """taming's `VQLPIPSWithDiscriminator` (the release's `loss.*` keys), built without its
    downloads: torchvision's VGG-16 and the LPIPS heads keep their random init."""
    import torchvision
    from taming.modules.losses import lpips
    from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

    offline = types.SimpleNamespace(vgg16=lambda pretrained=False: torchvision.models.vgg16())
    with (
        mock.patch.object(lpips, "models", offline),
        mock.patch.object(lpips.LPIPS, "load_from_pretrained", lambda self, name=None: None),
    ):
        return VQLPIPSWithDiscriminator(**loss)


def build_vqgan(out: Path, seed: int) -> dict[str, int]:
    """taming's `vqgan_imagenet_f16_1024`: `ckpts/last.ckpt` and `configs/model.yaml`."""
    from omegaconf import OmegaConf
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    paper = _paper_vqgan()
    ddconfig, n_embed, embed_dim = paper["ddconfig"], paper["n_embed"], paper["embed_dim"]
    loss_params = {k: paper["loss"][k] for k in _TAMING_LOSS_KEYS}
    z = ddconfig["z_channels"]
    with _seeded(seed):  # taming's VQModel: its attribute names give the state-dict keys
        model = nn.ModuleDict(
            {
                "encoder": Encoder(**ddconfig),
                "decoder": Decoder(**ddconfig),
                "loss": _taming_loss(loss_params),
                "quantize": VectorQuantizer2(n_embed, embed_dim, beta=paper["beta"]),
                "quant_conv": nn.Conv2d(z, embed_dim, 1),
                "post_quant_conv": nn.Conv2d(embed_dim, z, 1),
            }
        )
    folder = out / "vqgan_imagenet_f16_1024"
    (folder / "ckpts").mkdir(parents=True)
    (folder / "configs").mkdir()
    ckpt = {"epoch": 0, "global_step": 0, "state_dict": model.state_dict()}
    torch.save(ckpt, folder / "ckpts" / "last.ckpt")
    config = {
        "model": {
            "base_learning_rate": paper["learning_rate"],
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": embed_dim,
                "n_embed": n_embed,
                "ddconfig": ddconfig,
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": loss_params,
                },
            },
        }
    }
    OmegaConf.save(OmegaConf.create(config), folder / "configs" / "model.yaml")
    loss = model["loss"]
    return {
        "vqgan": _count(model) - _count(loss),
        "discriminator": _count(loss.discriminator),
        "lpips": _count(loss.perceptual_loss),
    }


def _openai_clip(name: str) -> Callable[[Path, int], dict[str, int]]:
    def build(out: Path, seed: int) -> dict[str, int]:
        """OpenAI's `clip/<name>.pt`: a TorchScript archive of the fp16 model (QuickGELU)."""
        import open_clip

        with _seeded(seed):
            model = open_clip.create_model(f"{name}-quickgelu").eval()
        params = {"clip": _count(model)}
        mask = model.attn_mask  # a constant in OpenAI's archives, not a buffer
        del model._buffers["attn_mask"]
        model.attn_mask = mask
        size = model.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        example = (torch.zeros(1, 3, *size), open_clip.get_tokenizer(name)(["a photo"]))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks as constants
            warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)  # deprecated
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
        (out / "clip").mkdir()
        traced.half().save(str(out / "clip" / f"{name}.pt"))  # the release is fp16
        return params

    return build


def _stable_diffusion(folder: str, in_channels: int) -> Callable[[Path, int], dict[str, int]]:
    def build(out: Path, seed: int) -> dict[str, int]:
        """A diffusers SD-2 folder (9-channel inpainting or 4-channel text-to-image UNet)."""
        from diffusers import (
            PNDMScheduler,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        from semani.modules.diffusion_parts import (
            SD2_SHAPES,
            SD_SCHEDULER,
            tiny_inpaint_components,
        )

        parts = tiny_inpaint_components(seed=seed, in_channels=in_channels, **SD2_SHAPES)
        # the real repositories' scheduler: PNDM (PLMS) with SD's betas, epsilon prediction
        schedule = {k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}
        parts["scheduler"] = PNDMScheduler(**schedule, skip_prk_steps=True)
        params = {k: _count(parts[k]) for k in ("unet", "vae", "text_encoder")}
        cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
        pipe = cls(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        del parts
        pipe.save_pretrained(out / folder)
        return params

    return build


def build_ovseg(out: Path, seed: int) -> dict[str, int]:
    """OVSeg's `ovseg_swinbase_vitL14_ft_mpt.pth`: every key its segmenter and its mask-prompt
    scorer read (the MaskFormer, the void embedding, the CLIP with its mask prompt)."""
    import open_clip

    from semani.alignment.segmenters.ovseg import (
        VOID_KEY,
        OVSegArch,
        build_ovseg_maskformer,
        hf_to_ovseg,
    )
    from semani.modules.mask_clip import OVSEG_CLIP_PREFIX, quickgelu_name

    arch = OVSegArch()
    with _seeded(seed):
        maskformer = build_ovseg_maskformer(arch)
        void = torch.randn(1, arch.embedding_dim)  # (1, D) OVSeg's non_object_embedding
    params = {"maskformer": _count(maskformer), "void": void.numel()}
    state = dict(hf_to_ovseg(maskformer.state_dict(), arch))
    del maskformer
    state[VOID_KEY] = void
    with _seeded(seed):
        clip = open_clip.create_model(quickgelu_name(OVSEG_CLIP))
        grid, width = clip.visual.grid_size, clip.visual.conv1.out_channels
        prompt = 0.02 * torch.randn(OVSEG_MASK_PROMPT_DEPTH, grid[0] * grid[1], width)
    params |= {"clip": _count(clip), "mask_prompt": prompt.numel()}
    state |= {OVSEG_CLIP_PREFIX + k: v for k, v in clip.state_dict().items()}
    state[OVSEG_CLIP_PREFIX + "visual.mask_embedding"] = prompt  # (depth, grid², width)
    del clip
    (out / "ovseg").mkdir()
    torch.save(
        {"model": state, "iteration": OVSEG_ITERATION},
        out / "ovseg" / "ovseg_swinbase_vitL14_ft_mpt.pth",
    )
    return params


def build_mask2former(out: Path, seed: int) -> dict[str, int]:
    """`facebook/mask2former-swin-large-coco-panoptic` as `save_pretrained` writes it."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=384,
        patch_size=4,
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = dict(enumerate(COCO_PANOPTIC_LABELS))
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_queries=200,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    with _seeded(seed):
        model = Mask2FormerForUniversalSegmentation(config)
    folder = out / "mask2former-swin-large-coco-panoptic"
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(
        size={"shortest_edge": 384, "longest_edge": 1333},
        ignore_index=255,
        num_labels=len(COCO_PANOPTIC_LABELS),
    ).save_pretrained(folder)
    return {"mask2former": _count(model)}


def build_tf_inception(out: Path, seed: int) -> dict[str, int]:
    """torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (its network's state dict)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            """Keep the random init: the weights are what is being written."""

    (out / "inception").mkdir()
    empty = out / "inception" / "empty.pth"
    torch.save({}, empty)  # read by the constructor instead of the download
    with _seeded(seed):
        net = Untrained("inception-v3-compat", ["logits_unbiased"], str(empty))
    empty.unlink()
    torch.save(net.state_dict(), out / "inception" / "weights-inception-2015-12-05-6726825d.pth")
    return {"inception": _count(net)}


def _stackgan_inception(kind: str, num_classes: int) -> Callable[[Path, int], dict[str, int]]:
    def build(out: Path, seed: int) -> dict[str, int]:
        """`inception/stackgan_<kind>_inception_v3.pth`: a torchvision `Inception3` state dict
        with num_classes + 1 outputs (the background first) and the aux logits."""
        from semani.metrics.classifiers import stackgan_inception3

        with _seeded(seed):
            net = stackgan_inception3(num_classes + 1, aux_logits=True)
        (out / "inception").mkdir()
        torch.save(net.state_dict(), out / "inception" / f"stackgan_{kind}_inception_v3.pth")
        return {"inception": _count(net)}

    return build


# ---------------------------------------------------------------------------------------------
# the components


@dataclass(frozen=True)
class Component:
    """One pretrained weight: `targets` (files or folders relative to the pretrained folder, as
    the registry entry `name` has them) that `build(staging, seed)` writes under a staging
    folder, returning its parameter counts per part; `required`: the files that say the
    component is present."""

    name: str
    targets: tuple[str, ...]
    required: tuple[str, ...]
    build: Callable[[Path, int], dict[str, int]]

    def __call__(self, out: Path, seed: int = 0) -> dict[str, int]:
        return self.build(out, seed)


def _targets(name: str) -> tuple[str, ...]:
    """What `scripts/download_weights.py --only <name>` writes: its files, else its folder."""
    entry = next(e for e in REGISTRY if e.name == name)
    return tuple(rel for rel, _ in entry.urls) or (entry.target,)


def _component(
    name: str, build: Callable[[Path, int], dict[str, int]], inside: Iterable[str] = ()
) -> Component:
    """`inside`: for a folder target, the files that must be in it."""
    targets = _targets(name)
    required = tuple(f"{targets[0]}/{f}" for f in inside) or targets
    return Component(name, targets, required, build)


_SD_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
_HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        _component("vqgan-imagenet-f16-1024", build_vqgan),
        _component("clip-vit-b32", _openai_clip("ViT-B-32")),
        _component("clip-vit-b16", _openai_clip("ViT-B-16")),
        _component("clip-rn50", _openai_clip("RN50")),
        _component(
            "sd2-inpainting", _stable_diffusion("stable-diffusion-2-inpainting", 9), _SD_FILES
        ),
        _component("sd2-base", _stable_diffusion("stable-diffusion-2-base", 4), _SD_FILES),
        _component("ovseg", build_ovseg),
        _component("mask2former", build_mask2former, _HF_FILES),
        _component("inception-coco", build_tf_inception),
        _component("inception-birds", _stackgan_inception("birds", 50)),
        _component("inception-flowers", _stackgan_inception("flowers", 20)),
    )
}


# ---------------------------------------------------------------------------------------------
# writing


def _files(root: Path, targets: Iterable[str]) -> list[str]:
    """The files of `targets` under `root`, as sorted relative POSIX paths."""
    out: list[str] = []
    for t in targets:
        path = root / t
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [PurePosixPath(p.relative_to(root)).as_posix() for p in found if p.is_file()]
    return out


def _remove_stale_staging(root: Path, name: str) -> None:
    """Delete the staging folders of `name` left by a process that is gone (killed mid-build)."""
    for folder in root.glob(f".{name}.*.tmp"):
        pid = folder.name[len(name) + 2 :].split(".")[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _install(staging: Path, root: Path, targets: Iterable[str]) -> None:
    """Move each target from the staging folder to its place (a folder replaces any old one)."""
    for t in targets:
        src, dst = staging / t, root / t
        if not src.exists():
            raise FileNotFoundError(f"the builder wrote no {t}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            replace_dir(src, dst)
        else:
            os.replace(src, dst)


def _read_record(root: Path) -> dict[str, dict]:
    path = root / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def build_paper_weights(
    root: str | os.PathLike,
    only: Iterable[str] | None = None,
    seed: int = 0,
    log: Callable[[str], object] = print,
) -> dict[str, dict]:
    """Write each component (all, or the names in `only`) under the pretrained folder `root`.

    One component at a time, freed before the next; each is built in a staging folder inside
    `root` and moved into place when whole, so an interrupted or failed build leaves nothing
    behind (a failure is raised after its staging folder is removed). A component whose
    required files are all there is skipped. Returns `{name: {"files": [relative paths],
    "params": {part: count}, "seconds": float}}` (skipped ones: what `root/SMOKE_WEIGHTS.json`
    recorded, with "skipped": True) and merges the built ones into that file.
    """
    root = Path(root)
    names = list(COMPONENTS) if only is None else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise ValueError(f"no smoke-weight builder for {unknown}; known: {list(COMPONENTS)}")
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in (n for n in COMPONENTS if n in names):
        component = COMPONENTS[name]
        if all((root / f).is_file() for f in component.required):
            results[name] = {
                "files": _files(root, component.targets),
                "params": {},
                "seconds": 0.0,
                **_read_record(root).get(name, {}),
                "skipped": True,
            }
            log(f"{name}: present in {root}, skipped")
            continue
        _remove_stale_staging(root, name)
        log(f"{name}: building (random weights, seed {seed}) ...")
        start = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=root))
        try:
            params = component(staging, seed)
            gc.collect()
            _install(staging, root, component.targets)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            gc.collect()
        entry = {
            "files": _files(root, component.targets),
            "params": params,
            "seconds": round(time.perf_counter() - start, 1),
            "seed": seed,
        }
        results[name] = entry
        record = _read_record(root) | {name: entry}
        write_text(root / RECORD, json.dumps(dict(sorted(record.items())), indent=2) + "\n")
        counts = ", ".join(f"{k} {v:,}" for k, v in params.items())
        log(f"{name}: wrote {len(entry['files'])} files in {entry['seconds']} s ({counts})")
    return results
