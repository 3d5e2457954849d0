"""Fine-tune a backbone with attention: ``python train.py model=resnet50 attention=cbam``."""

import sys
from pathlib import Path

# This clone's code, whatever another clone's editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

#: Config groups (``+group=option`` adds one; any other new top-level key is an error).
GROUPS = [p.name for p in (Path(__file__).resolve().parent / "conf").iterdir() if p.is_dir()]


def _train(cfg: DictConfig) -> dict:
    from attncam.stages.cli import one_line_per_record
    from attncam.stages.train import run

    one_line_per_record()
    return run(cfg)


def _check(cfg: DictConfig) -> None:
    """What can be checked before torch is imported: the checkpoint of ``resume=PATH``."""
    from attncam.stages.cli import check_paths_exist

    if cfg.get("resume") not in (None, "last"):
        check_paths_exist(cfg, ["resume"])


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Check the config, train, and report a user error in one line (exit status 2)."""
    from attncam.stages.cli import run_entry

    return run_entry(cfg, _train, checks=[_check], groups=GROUPS).get("val/acc")


if __name__ == "__main__":
    main()
