"""Evaluate a checkpoint: ``python eval.py experiment=<name> ckpt_path=<file>``."""

import hydra
from omegaconf import DictConfig

from semani.tasks.eval import main as eval_main


@hydra.main(version_base="1.3", config_path="configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> dict[str, float]:
    return eval_main(cfg)


if __name__ == "__main__":
    main()
