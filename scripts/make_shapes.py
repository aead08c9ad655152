"""Generate ShapesWorld in the CUB layout (see semani/data/shapes.py).

python scripts/make_shapes.py --out data/shapes --n-train 2000 --n-test 200 --size 64 --seed 0
"""

import logging

from semani.data.shapes import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
