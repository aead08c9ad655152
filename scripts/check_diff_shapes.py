"""Does a SeMani-Diff trained on ShapesWorld re-paint an entity in the colour the text asks for?

    python scripts/check_diff_shapes.py --model <run>/diffusers --data data/shapes
    python scripts/check_diff_shapes.py --model <run>/checkpoints/last.ckpt ...  # a checkpoint

Prints one JSON line. For each of the first ``--n`` test images, the first entity is re-painted
with `DiffEditor` (its own mask, DDIM ``--steps``, guidance ``--guidance``, seed = image index)
under the text "a <new colour> <shape>" ("an orange star"), the new colour drawn (seeded) from
the palette colours that are not the entity's own. Inside the mask, every pixel is assigned to
its nearest palette colour (`semani.data.shapes.COLORS`, RGB distance); the edit **succeeds**
when the requested colour is the most frequent one there. Reported:

- ``colour_success``: fraction of successful edits (chance: 1 / 11 for a model that paints a
  random palette colour; a model that ignores the text tends to repaint the old colour or the
  background);
- ``old_colour_kept``: fraction where the old colour is still the most frequent;
- ``requested_fraction``: mean fraction of mask pixels nearest to the requested colour;
- ``outside_changed``: number of pixels outside the mask that differ from the input in the edit
  (the pixel composite: must be 0);
- ``outside_l2``: the mean squared error ([0, 1] scale) outside the mask of the model's own
  decoded image, before the composite: how much of the background the model itself keeps
  (what differs between the guidance forms, ``--guidance-form paper|diffusers``);
- ``vae_ceiling``: fraction of the same entities whose own colour still dominates their mask
  after a round trip through the model's VAE alone (encode, posterior mean; decode): what a
  perfect denoiser could show through this VAE (small entities blur into the background);
- ``success_by_size``: ``colour_success`` per entity size ("small", "medium", "large");
- ``shape_iou``: the IoU of the pixels painted in the requested colour with the entity's own
  mask: whether the new look keeps the entity's shape. With ``--mask box`` the edit's mask is
  the entity's bounding box grown by 2 px (a loose mask, as a segmenter or a user may give),
  where plain inpainting (``--strength 1``) may paint any shape and a partial noising of the
  entity's own latents (``--strength 0.6``) keeps it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from semani.data.shapes import ShapesWorldDataset
from semani.data.shapes_generator import COLORS, with_article
from semani.data.transforms import to_uint8
from semani.manipulation.diff_editor import DiffEditor
from semani.manipulation.pixels import as_source, composite, feather_weights

log = logging.getLogger("check_diff_shapes")

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (C, 3) 0..255
NAMES = list(COLORS)


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB -> (N,) index of the nearest palette colour."""
    d = ((pixels[:, None, :].astype(np.float32) - PALETTE[None]) ** 2).sum(-1)  # (N, C)
    return d.argmin(1)


@torch.inference_mode()
def dominant(pixels: np.ndarray) -> str:
    """The palette colour most of (N, 3) uint8 pixels are nearest to."""
    return NAMES[int(np.bincount(nearest_colour(pixels), minlength=len(NAMES)).argmax())]


def load_editor(model: str, steps: int, guidance: float, form: str = "paper") -> DiffEditor:
    path = Path(model)
    # at the size the model was trained at (side="native"), resized back to the image's
    kw = {"steps": steps, "guidance_scale": guidance, "guidance_form": form, "composite": False,
          "side": "native"}  # fmt: skip
    if not path.is_file():
        return DiffEditor.from_pretrained(str(path), **kw)
    import tempfile  # a SemaniDiffModule checkpoint: export its weights to a folder first

    import semani

    module = semani.load_model(path)
    with tempfile.TemporaryDirectory(prefix="semani_diff_") as tmp:
        module.save_pretrained(Path(tmp) / "diffusers")
        return DiffEditor.from_pretrained(f"{tmp}/diffusers", **kw)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a diffusers folder or a checkpoint")
    p.add_argument("--data", required=True, help="the ShapesWorld root")
    p.add_argument("--n", type=int, default=100, help="test images to edit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--feather", type=int, default=0, help="seam width (0: hard mask)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-form", default="paper", choices=["paper", "diffusers"])
    p.add_argument("--strength", type=float, default=1.0, help="1: inpaint from noise")
    p.add_argument(
        "--mask",
        default="entity",
        choices=["entity", "box"],
        help="the edit's mask: the entity's own, or its box grown by 2 px",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    editor = load_editor(args.model, args.steps, args.guidance, args.guidance_form)
    ds = ShapesWorldDataset(args.data, split="test", image_size=64, context_length=77)
    rng = np.random.default_rng(args.seed)
    n = min(args.n, len(ds))
    success = kept = outside = ceiling = 0
    by_size: dict[str, list[bool]] = {}
    fractions, outside_l2, shape_iou = [], [], []
    for i in range(n):
        sample = ds[i]
        meta = json.loads((ds.root / "entities" / f"{ds.keys[i]}.json").read_text())
        entity = meta["entities"][0]
        mask = sample["entity_masks"][0] > 0.5  # (H, W)
        if not mask.any():
            continue
        new = str(rng.choice([c for c in NAMES if c != entity["color"]]))
        image = to_uint8(sample["image"])  # (3, H, W)
        src = image.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        m = mask.numpy()
        own = m.copy()  # the entity's own pixels
        if args.mask == "box":
            ys, xs = np.nonzero(m)
            m = np.zeros_like(m)
            m[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = True
        raw = editor.edit(src, m, with_article(f"{new} {entity['name']}"), seed=args.seed + i,
                          strength=args.strength)  # fmt: skip
        raw = raw[0]  # (H, W, 3) uint8: the model's own image, no composite
        outside_l2.append(float((((raw[~m] - src[~m].astype(np.float32)) / 255) ** 2).mean()))
        weights = feather_weights(m, args.feather)
        out = composite(as_source(src), torch.from_numpy(raw).permute(2, 0, 1)[None] / 255,
                        weights)[0]  # fmt: skip
        outside += int((out[~m] != src[~m]).any(-1).sum())
        out = out if args.feather else raw  # inside the mask they are equal without a seam
        painted = (nearest_colour(out.reshape(-1, 3)) == NAMES.index(new)).reshape(own.shape) & m
        shape_iou.append(float((painted & own).sum() / max((painted | own).sum(), 1)))
        m = own  # the colour is judged on the entity's own pixels
        counts = np.bincount(nearest_colour(out[m]), minlength=len(NAMES))
        top = NAMES[int(counts.argmax())]
        success += top == new
        by_size.setdefault(entity["size"], []).append(top == new)
        kept += top == entity["color"]
        fractions.append(counts[NAMES.index(new)] / counts.sum())
        ceiling += dominant(editor.autoencode(sample["image"])[m]) == entity["color"]
    done = len(fractions)
    result = {
        "model": args.model,
        "n": done,
        "steps": args.steps,
        "guidance": args.guidance,
        "guidance_form": args.guidance_form,
        "colour_success": success / max(done, 1),
        "old_colour_kept": kept / max(done, 1),
        "requested_fraction": float(np.mean(fractions)) if fractions else 0.0,
        "chance": 1 / len(NAMES),
        "outside_changed": outside,
        "outside_l2": float(np.mean(outside_l2)) if outside_l2 else 0.0,
        "shape_iou": float(np.mean(shape_iou)) if shape_iou else 0.0,
        "strength": args.strength,
        "mask": args.mask,
        "vae_ceiling": ceiling / max(done, 1),
        "success_by_size": {k: float(np.mean(v)) for k, v in sorted(by_size.items())},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
