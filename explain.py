"""Explain a model's decisions and score the maps: ``python explain.py ckpt=PATH method=paper``."""

import sys
from pathlib import Path

# This clone's code, whatever another clone's editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

#: Config groups (``+group=option`` adds one; any other new top-level key is an error).
GROUPS = [p.name for p in (Path(__file__).resolve().parent / "conf").iterdir() if p.is_dir()]


def _explain(cfg: DictConfig) -> dict:
    from attncam.stages.cli import one_line_per_record
    from attncam.stages.explain import run

    one_line_per_record()
    return run(cfg)


def _list_layers(cfg: DictConfig) -> str:
    from attncam.stages.cli import one_line_per_record
    from attncam.stages.inputs import list_layers

    one_line_per_record()
    return list_layers(cfg)


def _check(cfg: DictConfig) -> None:
    """What can be checked before torch is imported: limit, the checkpoint file, the weights."""
    from attncam.stages.cli import check_limit, check_model_weights, check_paths_exist

    check_limit(cfg.get("limit"))
    check_paths_exist(cfg, ["ckpt"])
    check_model_weights(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> dict:
    """Check the config, explain, and report a user error in one line (exit status 2)."""
    from attncam.stages.cli import run_entry, run_info

    if cfg.get("list_layers"):
        return run_info(cfg, _list_layers, checks=[_check], groups=GROUPS)
    return run_entry(cfg, _explain, checks=[_check], groups=GROUPS)


if __name__ == "__main__":
    main()
