"""Result names and slugs: the names the Explainer gives, and the keys ``maps.npz`` holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from attncam.explain import Explainer, find_result, methods_from_config, result_name, slug
from attncam.explain.methods.registry import build_method
from attncam.models.net import AttentionNet

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"

# (method key, options) -> (result name, maps.npz key written by the explain stage so far)
KNOWN = [
    ("gradcam", {}, "gradcam", "gradcam"),
    ("gradcam", {"layer": None, "counterfactual": False}, "gradcam", "gradcam"),
    ("gradcam", {"counterfactual": True}, "gradcam[counterfactual]", "gradcam__counterfactual"),
    ("gradcampp", {"variant": "torchcam020"}, "gradcampp[torchcam020]", "gradcampp__torchcam020"),
    ("gradcampp", {"variant": "formula"}, "gradcampp", "gradcampp"),
    ("smoothgradcampp", {"variant": "torchcam020"}, "smoothgradcampp[torchcam020]",
     "smoothgradcampp__torchcam020"),
    ("attention_guided", {"variant": "spatial_product"}, "attention_guided[spatial_product]",
     "attention_guided__spatial_product"),
    ("attention_guided", {"variant": "multi_stage", "combine": "product"},
     "attention_guided[multi_stage]", "attention_guided__multi_stage"),
    ("attention_guided", {"variant": "multi_stage", "combine": "mean"},
     "attention_guided[combine=mean,multi_stage]", "attention_guided__combine-mean_multi_stage"),
    ("scacam", {"channel_weight": "fc"}, "scacam[channel_weight=fc]", "scacam__channel_weight-fc"),
    ("smoothgradcampp", {"n": 2, "sigma": 0.1}, "smoothgradcampp[n=2,sigma=0.1]",
     "smoothgradcampp__n-2_sigma-0_1"),
]  # fmt: skip


def _old_safe(name: str) -> str:
    """The explain stage's ``_safe`` before ``slug`` existed (the maps.npz keys on disk)."""
    return name.replace(".", "_").replace("[", "__").replace("]", "").replace("=", "-").replace(",", "_")  # fmt: skip


@pytest.mark.parametrize(("key", "options", "name", "npz_key"), KNOWN)
def test_result_name_and_slug_of_known_results(
    key: str, options: dict, name: str, npz_key: str
) -> None:
    assert result_name(key, options) == name
    assert build_method(key, options).name == name  # what the Explainer names the map
    assert slug(name) == npz_key == _old_safe(name)


def test_every_method_config_names_its_results_as_before() -> None:
    for path in sorted(CONF.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        entries = {k: v for k, v in cfg.items() if isinstance(v, dict) and "key" in v}
        for key, options in methods_from_config(entries):
            name = build_method(key, options).name
            assert result_name(key, options) == name
            assert slug(name) == _old_safe(name)


def test_find_result_reads_names_and_npz_slugs(tmp_path: Path) -> None:
    net = AttentionNet("tiny", 3, "cbam", "last")
    explainer = Explainer(net, ["gradcam", ("gradcampp", {"variant": "torchcam020"})])
    maps = explainer(torch.rand(2, 3, 32, 32))
    path = tmp_path / "maps.npz"
    np.savez_compressed(path, **{slug(n): m.numpy() for n, m in maps.items()})
    with np.load(path) as z:
        assert sorted(z.files) == ["gradcam", "gradcampp__torchcam020"]
        for n in explainer.names:
            assert np.array_equal(find_result(z, n), maps[n].numpy())
            assert find_result(maps, n) is maps[n]
        with pytest.raises(KeyError, match="no result 'xgradcam'.*stored: gradcam, gradcampp__"):
            find_result(z, "xgradcam")


def test_result_name_checks_the_key() -> None:
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+'; choose one of: "):
        result_name("gradcam+", {})
    assert result_name("anything", {"a": 1}, defaults={"a": 0}) == "anything[a=1]"
