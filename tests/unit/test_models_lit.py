"""``ClassifierModule.from_config``: the class signature is the one source of defaults.

The reference is the train stage's former ``build_module`` (copied below as it was): for the
default and demo configs, and for every model and attention option, ``from_config`` must build the
module with exactly the arguments ``build_module`` gave. The YAML restates the signature's
defaults (so that ``optim.lr=...`` stays a plain override); a test keeps them equal.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import attncam.models as models_pkg
from attncam.models import checkpoint, finetuning, lit_module
from attncam.models.lit_module import OPTIM_ARGS, ClassifierModule

CONF = Path(__file__).resolve().parents[2] / "conf"
DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(ClassifierModule.__init__).parameters.items()
    if k != "self"
}


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _old_build_module_args(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """The arguments ``stages/train.py:build_module`` passed before ``from_config`` existed."""
    m, o = cfg.model, cfg.optim
    return dict(
        backbone=m.backbone,
        num_classes=num_classes,
        attention=m.get("attention", "none"),
        placement=m.get("placement", "blocks"),
        reduction=m.get("reduction", 16),
        kernel_size=m.get("kernel_size", 7),
        pretrained=m.get("pretrained", False),
        weights=m.get("weights"),
        channels_last=m.get("channels_last", False),
        optimizer=o.optimizer,
        lr=o.lr,
        lr_pretrained=o.get("lr_pretrained"),
        momentum=o.get("momentum", 0.9),
        weight_decay=o.get("weight_decay", 0.0),
        scheduler=o.get("scheduler", "none"),
        step_size=o.get("step_size", 30),
        gamma=o.get("gamma", 0.1),
        warmup_epochs=o.get("warmup_epochs", 0),
        max_epochs=cfg.trainer.get("max_epochs") or 1,
        label_smoothing=o.get("label_smoothing", 0.0),
    )


class _Built(Exception):
    """Raised by the recording ``__init__`` in place of building a network."""

    def __init__(self, args: dict[str, Any]) -> None:
        super().__init__()
        self.kwargs = args


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``ClassifierModule(...)`` raises :class:`_Built` with every argument, defaults applied."""
    original = ClassifierModule.__init__

    @functools.wraps(original)
    def record(self: ClassifierModule, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        bound.apply_defaults()
        raise _Built({k: v for k, v in bound.arguments.items() if k != "self"})

    monkeypatch.setattr(ClassifierModule, "__init__", record)
    yield


def _args_of(build: Any) -> dict[str, Any]:
    with pytest.raises(_Built) as built:
        build()
    return built.value.kwargs


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# model=by_name leaves the backbone mandatory (???): the user names it.
_BY_NAME = {"by_name": ["model.backbone=timm:resnet10t"]}


@pytest.mark.parametrize(
    "overrides",
    [[], ["experiment=demo"], ["experiment=an2022"], ["trainer.max_epochs=null"],
     ["optim.lr_pretrained=null", "optim.scheduler=step", "model.channels_last=true"]]
    + [[f"model={m}"] + _BY_NAME.get(m, []) for m in _options("model")]
    + [[f"attention={a}"] for a in _options("attention")],
    ids=lambda o: " ".join(o) or "default",
)  # fmt: skip
def test_from_config_builds_what_build_module_built(recorded: None, overrides: list[str]) -> None:
    cfg = _compose(overrides)
    max_epochs = cfg.trainer.get("max_epochs") or 1
    got = _args_of(lambda: ClassifierModule.from_config(cfg.model, cfg.optim, 7, max_epochs))
    expected = {**DEFAULTS, **_old_build_module_args(cfg, 7)}
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}


def test_yaml_restates_the_signature_defaults() -> None:
    train = yaml.safe_load((CONF / "train.yaml").read_text())
    assert set(train["optim"]) == set(OPTIM_ARGS)
    for key, value in train["optim"].items():
        assert value == DEFAULTS[key], f"conf/train.yaml optim.{key}"
    attention_default = next(d["attention"] for d in train["defaults"] if "attention" in d)
    assert attention_default == DEFAULTS["attention"]
    for name in _options("attention"):
        group = yaml.safe_load((CONF / "attention" / f"{name}.yaml").read_text())
        for key in ("placement", "reduction", "kernel_size"):
            assert group[key] == DEFAULTS[key], f"conf/attention/{name}.yaml {key}"
    for name in _options("model"):
        group = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
        assert group["weights"] is None and group["channels_last"] is DEFAULTS["channels_last"]


def test_from_config_passes_only_given_keys(recorded: None) -> None:
    got = _args_of(lambda: ClassifierModule.from_config({"backbone": "tiny"}, {}, 3, 2))
    assert got == {**DEFAULTS, "backbone": "tiny", "num_classes": 3, "max_epochs": 2}


def test_from_config_names_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown model key\(s\) 'reductoin'.*valid keys: "):
        ClassifierModule.from_config({"backbone": "tiny", "reductoin": 8}, {}, 3, 1)
    with pytest.raises(ValueError, match=r"unknown optim key\(s\) 'nesterov'.*momentum"):
        ClassifierModule.from_config({"backbone": "tiny"}, {"nesterov": True}, 3, 1)
    with pytest.raises(ValueError, match="no 'backbone'"):
        ClassifierModule.from_config({"attention": "cbam"}, {}, 3, 1)
    with pytest.raises(
        ValueError, match="unknown optimizer 'adagrad'; choose one of: sgd, adam, adamw"
    ):
        ClassifierModule.from_config({"backbone": "tiny"}, {"optimizer": "adagrad"}, 3, 1)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_couples_weight_decay_and_adamw_decouples_it(optimizer: str) -> None:
    """One step with a zero loss gradient, by hand: Adam's L2 term ``wd * p`` goes through the
    adaptive step (``p - lr * sign(p)`` on the first step), AdamW only decays ``p * (1 - lr * wd)``.
    """
    lr, wd = 0.01, 0.1
    module = ClassifierModule(
        "tiny", 3, attention="none", optimizer=optimizer, lr=lr, weight_decay=wd, scheduler="none"
    )
    opt = module.configure_optimizers()
    assert type(opt) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    p = module.net.classifier().weight
    before = p.detach().clone()
    for q in module.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    if optimizer == "adam":
        expect = before - lr * torch.sign(before)  # m_hat / sqrt(v_hat) = sign(wd * p)
    else:
        expect = before * (1 - lr * wd)
    assert torch.allclose(p.detach(), expect, atol=1e-6)


def test_from_config_builds_a_real_module() -> None:
    cfg = _compose(["model=tiny", "attention=cbam", "model.placement=last"])
    module = ClassifierModule.from_config(cfg.model, cfg.optim, 4, 3)
    assert module.net.num_classes == 4 and module.net.attention_names == ["features.attention"]
    assert module.hparams.max_epochs == 3 and module.hparams.lr == cfg.optim.lr


def test_moved_names_are_re_exported() -> None:
    for name in ("ARCHITECTURE_HPARAMS", "CheckpointError", "check_hparams", "load_classifier",
                 "read_checkpoint"):  # fmt: skip
        assert getattr(lit_module, name) is getattr(checkpoint, name)
        assert getattr(models_pkg, name) is getattr(checkpoint, name)
    assert lit_module.FreezePretrained is finetuning.FreezePretrained
    assert models_pkg.FreezePretrained is finetuning.FreezePretrained
    assert models_pkg.ClassifierModule is ClassifierModule
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = models_pkg.nope
