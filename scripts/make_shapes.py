"""Generate ShapesWorld in the CUB layout (see semani/data/shapes_generator.py).

python scripts/make_shapes.py --out data/shapes --n-train 2000 --n-test 200 --size 64 --seed 0
"""

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from semani.data.shapes_generator import generate_shapes


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` and write the data set; returns the output folder."""
    p = argparse.ArgumentParser(description="Generate the ShapesWorld data set (CUB layout).")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing ShapesWorld")
    args = p.parse_args(argv)
    return generate_shapes(
        args.out, args.n_train, args.n_test, args.size, args.seed, args.overwrite
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
