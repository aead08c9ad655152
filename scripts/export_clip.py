"""Write the open_clip weights of a ClipTrainModule checkpoint (experiment=clip_shapes):

    python scripts/export_clip.py logs/clip_shapes/runs/<run>/checkpoints/last.ckpt \
        --out pretrained/clip/semani-shapes-ViT.pt

The file is a plain open_clip state dict (torch.save). Use it wherever a CLIP is configured,
e.g. `model.clip='{model_name: semani-shapes-ViT, pretrained: <file>}'`, or
`open_clip.create_model("semani-shapes-ViT", pretrained=<file>)` after
`import semani.modules.clip` (which registers the architectures of semani/modules/clip_configs/).
Training writes the same file to `<run>/clip/open_clip_model.pt`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from semani.models.clip_module import export_open_clip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="a ClipTrainModule Lightning checkpoint")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="output file (default: <run>/clip/open_clip_model.pt beside checkpoints/)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or args.ckpt.resolve().parent.parent / "clip" / "open_clip_model.pt"
    return export_open_clip(args.ckpt, out)


if __name__ == "__main__":
    main()
