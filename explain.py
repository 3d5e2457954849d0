"""Explain a model's decisions and score the maps: ``python explain.py ckpt=PATH method=paper``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from attncam.stages.explain import run

    run(cfg)


if __name__ == "__main__":
    main()
