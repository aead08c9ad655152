"""The user study of Table II: build anonymised ranking questionnaires, then score the answers.

python scripts/user_study.py make --methods SeMani-Diff=out/diff Blended-LDM=out/bld \
    --inputs data/cub/test_inputs --texts texts.csv --out study --cases 20 --seed 0
python scripts/user_study.py score answers/*.csv --key study/key.json --out table2.md

See semani/evaluation/user_study.py for the layout of the questionnaire folder and of the CSVs.
"""

import logging

from semani.evaluation.user_study import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
