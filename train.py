"""Train a SeMani model: ``python train.py experiment=<name> [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from semani.tasks.train import main as train_main


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    return train_main(cfg)


if __name__ == "__main__":
    main()
