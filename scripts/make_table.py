"""Merge the Table-I rows of several evaluation runs beside the paper's numbers
(see semani/evaluation/tables.py).

python scripts/make_table.py logs/eval_semani_diff_cub/runs/<run> \
    logs/eval_semani_trans_cub/runs/<run>
python scripts/make_table.py RUN_DIRS... --latex --out table1.tex
"""

import logging

from semani.evaluation.tables import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
