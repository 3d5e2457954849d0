"""Fine-tune a backbone with attention: ``python train.py model=resnet50 attention=cbam``."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from attncam.stages.train import run

    return run(cfg).get("val/acc")


if __name__ == "__main__":
    main()
