"""Edit an image with words: ``python manipulate.py image=<file> entity=<word> text=<text>``."""

import hydra
from omegaconf import DictConfig

from semani.tasks.manipulate import main as manipulate_main


@hydra.main(version_base="1.3", config_path="configs", config_name="manipulate.yaml")
def main(cfg: DictConfig) -> dict:
    return manipulate_main(cfg)


if __name__ == "__main__":
    main()
