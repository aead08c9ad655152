"""Does a SeMani-Trans trained on ShapesWorld follow the caption? Prints one JSON line.

    python scripts/check_trans_shapes.py --ckpt logs/.../checkpoints/last.ckpt --data data/shapes

Three measurements on the ShapesWorld test split:

- **caption use**: ``image_nll`` is the mean image-token cross-entropy (nats) of the test images'
  VQGAN tokens given their own caption, ``image_nll_shuffled`` given another image's caption;
  ``caption_nll_gain`` (their difference) is 0 for a model that ignores the text.

The other two are read off the pixels with the generator's palette (``semani.data.shapes.COLORS``):

- **generation**: sample a whole image from each test caption; an entity of the caption counts as
  drawn when at least ``--min-frac`` of the pixels lie within ``--radius`` (RGB distance) of its
  colour. ``colour_recall`` is the fraction of caption entities drawn; ``colour_recall_shuffled``
  is the same with the colours of another image's caption (the chance level to beat).
- **manipulation** (eL-TGIM): the first entity's colour word is replaced by an unused colour, its
  mask turned into a token mask, and the tokens there re-sampled with vision guidance
  (``TransTokenEditor``). ``edit_success`` is the fraction of edits where, inside the entity
  mask, the new colour covers more pixels than the old one; ``outside_l2`` is the mean squared
  difference (images in [-1, 1]), outside the token mask's pixels, between the edit and the VQGAN
  reconstruction of the unedited tokens (forced tokens are equal: only the decoder's receptive
  field lets an edit bleed out). ``--unguided`` also makes each edit without the grayscale
  tokens (``edit_success_unguided``): the entity's shape is then free to change too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

import semani
from semani.data.shapes import ShapesWorldDataset
from semani.data.shapes_generator import COLORS
from semani.data.tokenizer import TextTokenizer
from semani.manipulation.sampling import sample_image_tokens
from semani.manipulation.trans import MaskTooSmallError, TransTokenEditor, mask_to_token_mask
from semani.models.semani_trans import SemaniTransModule
from semani.modules.trans_losses import image_loss

log = logging.getLogger("check_trans_shapes")


def colour_fraction(
    images: torch.Tensor, rgb: tuple[int, int, int], radius: float
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W) bool: pixels within ``radius`` of ``rgb`` (0..255)."""
    pix = (images.clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W) in 0..255
    target = torch.tensor(rgb, dtype=pix.dtype).view(1, 3, 1, 1)
    return (pix - target).norm(dim=1) < radius  # (B, H, W)


def entity_colours(ds: ShapesWorldDataset, index: int) -> list[dict]:
    """The entity records (name, colour, rgb, ...) of test image ``index``."""
    meta_path = ds.root / "entities" / f"{ds.keys[index]}.json"
    return json.loads(meta_path.read_text())["entities"]


@torch.inference_mode()
def caption_nll(
    model: SemaniTransModule, tok: TextTokenizer, samples: list[dict], batch: int
) -> tuple[float, float]:
    """Mean image-token NLL (nats) of the test images under their own caption and under the
    caption of another image (the same pairing as ``colour_recall_shuffled``)."""
    n = len(samples)
    captions = [s["caption"] for s in samples]
    others = [captions[(i + n // 2) % n] for i in range(n)]
    totals = [0.0, 0.0]
    for start in range(0, n, batch):
        images = torch.stack([s["image"] for s in samples[start : start + batch]])
        target = model.image_tokens(images).flatten(1)  # (b, Li)
        for k, texts in enumerate((captions, others)):
            out = model.gpt(tok(texts[start : start + batch]), target)
            totals[k] += image_loss(out.image_logits, target).item() * len(images)
    return totals[0] / n, totals[1] / n


def main(argv: list[str] | None = None) -> dict:
    """Run the checks (``argv``: the command-line arguments) and return the printed JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="SemaniTransModule Lightning checkpoint")
    p.add_argument("--data", default="data/shapes", help="ShapesWorld root")
    p.add_argument("--n", type=int, default=64, help="test images to use")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--radius", type=float, default=60.0)
    p.add_argument("--min-frac", type=float, default=0.01)
    p.add_argument("--filter-thres", type=float, default=0.9)
    p.add_argument("--out", default=None, help="write sample grids (PNG) into this folder")
    p.add_argument(
        "--unguided",
        action="store_true",
        help="also recolour without grayscale vision guidance (edit_success_unguided)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    model = semani.load_model(args.ckpt)
    if not isinstance(model, SemaniTransModule):
        raise SystemExit(f"--ckpt {args.ckpt} holds a {type(model).__name__}, not SeMani-Trans")
    gpt, vqgan = model.gpt, model.vqgan
    tok = TextTokenizer(context_length=gpt.config.text_len)
    h = w = int(gpt.config.image_len**0.5)  # token grid
    size = h * vqgan.downsample_factor  # image side the model was trained on
    ds = ShapesWorldDataset(args.data, "test", image_size=size, context_length=gpt.config.text_len,
                            deterministic=True)  # fmt: skip
    n = min(args.n, len(ds))
    samples = [ds[i] for i in range(n)]
    ents = [entity_colours(ds, i) for i in range(n)]
    gen = torch.Generator().manual_seed(args.seed)

    # ---- does the model read the caption? image-token NLL under the right and a wrong one
    nll, nll_shuffled = caption_nll(model, tok, samples, args.batch)

    # ---- generation from the caption
    drawn, drawn_shuffled, total = 0, 0, 0
    generated = []
    for start in range(0, n, args.batch):
        chunk = samples[start : start + args.batch]
        text = tok([s["caption"] for s in chunk])
        with torch.inference_mode():
            tokens = sample_image_tokens(gpt, text, filter_thres=args.filter_thres, generator=gen)
            images = vqgan.decode_tokens(tokens.view(-1, h, w))
        generated.append(images)
        for j, img in enumerate(images):
            i = start + j
            other = ents[(i + n // 2) % n]
            for e in ents[i]:
                total += 1
                frac = colour_fraction(img[None], tuple(e["rgb"]), args.radius).float().mean()
                drawn += int(frac >= args.min_frac)
            for e in other[: len(ents[i])]:
                frac = colour_fraction(img[None], tuple(e["rgb"]), args.radius).float().mean()
                drawn_shuffled += int(frac >= args.min_frac)
    # shuffled recall is normalised by the entities actually compared
    n_shuffled = sum(min(len(ents[i]), len(ents[(i + n // 2) % n])) for i in range(n))

    # ---- manipulation: recolour the first entity
    editor = TransTokenEditor(gpt, vqgan, tok, filter_thres=args.filter_thres)
    success, edits, outside = 0, 0, []
    edited_images = []
    unguided = 0
    for i in range(n):
        s, e = samples[i], ents[i][0]
        used = {x["color"] for x in ents[i]}
        new = [c for c in COLORS if c not in used][(i * 7) % (len(COLORS) - len(used))]
        if e["color"] not in s["caption"]:
            continue
        text = s["caption"].replace(e["color"], new, 1)
        try:
            mask = mask_to_token_mask(s["entity_masks"][0], (h, w), min_tokens=1)
        except MaskTooSmallError:
            continue
        orig, new_tokens = editor.edit_tokens(
            s["image"], mask, text, gray_guidance=True, seed=args.seed + i
        )  # (1, h, w) each
        with torch.inference_mode():
            out, recon = vqgan.decode_tokens(torch.cat([new_tokens, orig]))  # (3, H, W) each
        pix_mask = s["entity_masks"][0] > 0.5  # (H, W)
        new_px = colour_fraction(out[None], COLORS[new], args.radius)[0][pix_mask].sum()
        old_px = colour_fraction(out[None], tuple(e["rgb"]), args.radius)[0][pix_mask].sum()
        success += int(new_px > old_px)
        edits += 1
        if args.unguided:  # the same edit without the grayscale tokens of the entity
            _, free = editor.edit_tokens(s["image"], mask, text, gray_guidance=False,
                                         seed=args.seed + i)  # fmt: skip
            with torch.inference_mode():
                out_free = vqgan.decode_tokens(free)[0]
            new_free = colour_fraction(out_free[None], COLORS[new], args.radius)[0][pix_mask]
            old_free = colour_fraction(out_free[None], tuple(e["rgb"]), args.radius)[0][pix_mask]
            unguided += int(new_free.sum() > old_free.sum())
        up = F.interpolate(
            mask[None, None].float(), size=out.shape[-2:], mode="nearest"
        )  # (1,1,H,W)
        keep = up[0, 0] < 0.5  # (H, W): pixels of tokens that were forced
        outside.append(((out - recon) ** 2)[:, keep].mean().item())
        edited_images.append(torch.stack([s["image"], out]))

    if args.out:
        from torchvision.utils import save_image

        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image((torch.cat(generated)[:32] + 1) / 2, out_dir / "generated.png", nrow=8)
        if edited_images:
            save_image((torch.cat(edited_images[:16]) + 1) / 2, out_dir / "edits.png", nrow=8)
        (out_dir / "captions.txt").write_text("\n".join(s["caption"] for s in samples[:32]))

    result = {
        "ckpt": args.ckpt, "images": n,
        "image_nll": round(nll, 4), "image_nll_shuffled": round(nll_shuffled, 4),
        "caption_nll_gain": round(nll_shuffled - nll, 4),
        "colour_recall": round(drawn / max(total, 1), 4),
        "colour_recall_shuffled": round(drawn_shuffled / max(n_shuffled, 1), 4),
        "edits": edits, "edit_success": round(success / max(edits, 1), 4),
        "outside_l2": round(sum(outside) / max(len(outside), 1), 5),
    }  # fmt: skip
    if args.unguided:
        result["edit_success_unguided"] = round(unguided / max(edits, 1), 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
