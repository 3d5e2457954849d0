"""The guidance experiment's parts: tails, controls, measures, statistics and decision rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from attncam.explain.hooks import capture
from attncam.models.net import AttentionNet
from attncam.stages.reproduce.guidance import analysis as A
from attncam.stages.reproduce.guidance.experiment import arms
from attncam.stages.reproduce.guidance.heads import Arm, Tail, attention_module, cache_site
from attncam.stages.reproduce.guidance.scoring import (
    derangement,
    foreign_gate,
    gate_contrast,
    pixel_auc,
    raw_gates,
)

# --------------------------------------------------------------------------- tails and gates


@pytest.mark.parametrize("placement", ["last", "after:blocks.5"])
def test_tail_on_cached_features_equals_the_whole_network(placement: str) -> None:
    """The tail trained on cached features is exactly the rest of the network's forward."""
    net = AttentionNet("efficientnet_lite0", 5, attention="cbam", placement=placement).eval()
    arm = Arm("a", placement=placement)
    site = cache_site(arm, net)
    assert site == ("features.bn2" if placement == "last" else "features.blocks.5")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), capture(net, [site]) as acts:
        whole = net(x)
    with torch.no_grad():
        tail = Tail(net, site).eval()(acts[site])
    torch.testing.assert_close(tail, whole, rtol=1e-5, atol=1e-5)
    names = Tail(net, site).names
    assert any("attention" in n for n in names) and names[-1] != site


def test_placement_after_a_layer_inserts_one_module_and_names_bad_layers() -> None:
    net = AttentionNet("efficientnet_lite0", 3, attention="cbam", placement="after:blocks.5")
    assert net.attention_names == ["features.blocks.attention_blocks_5"]
    with pytest.raises(ValueError, match=r"no layer 'blocks\.9'.*conv_stem, bn1, blocks"):
        AttentionNet("efficientnet_lite0", 3, attention="cbam", placement="after:blocks.9")
    with pytest.raises(ValueError, match="after:<layer>"):
        AttentionNet("efficientnet_lite0", 3, attention="cbam", placement="middle")


def _tiny_net() -> AttentionNet:
    net = AttentionNet("efficientnet_lite0", 4, attention="cbam", placement="last").eval()
    with torch.no_grad():
        attention_module(net).spatial_gate.bn.weight.fill_(1.0)  # a gate that varies
    return net


def test_foreign_gate_replaces_m_s_in_the_forward_pass() -> None:
    """With another image's M_s, the CBAM output is M_c-gated F times that M_s (eq. 1)."""
    net = _tiny_net()
    images = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    gates = raw_gates(net, images, 3)
    x = images.float() / 255
    cbam = attention_module(net)
    with torch.no_grad(), capture(net, ["features.bn2"]) as acts:
        own = net(x)
    f = acts["features.bn2"]
    perm = derangement(3, 0)
    with torch.no_grad():
        f1 = f * cbam.channel_gate(f)
        expected = net.head(f1 * gates[perm][:, None])
        with foreign_gate(net, gates[perm]) as state:
            state["ids"] = torch.arange(3)
            swapped = net(x)
        with foreign_gate(net, gates) as state:  # its own gates: nothing changes
            state["ids"] = torch.arange(3)
            same = net(x)
    torch.testing.assert_close(swapped, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(same, own, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(swapped, own)


def test_derangement_moves_every_image() -> None:
    for n in (2, 3, 10, 160):
        p = derangement(n, 7)
        assert sorted(p.tolist()) == list(range(n))
        assert bool((p != torch.arange(n)).all())


def test_pixel_auc_by_hand() -> None:
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    maps = torch.tensor([
        [[1.0, 0.0], [0.0, 0.0]],   # object pixel above all three background pixels: 1
        [[0.0, 1.0], [1.0, 1.0]],   # below all: 0
        [[0.5, 0.5], [0.5, 0.5]],   # constant: ties count half, 0.5
        [[0.5, 1.0], [0.0, 0.5]],   # above one, tied with one, below one: (1 + 0.5) / 3
    ])  # fmt: skip
    got = pixel_auc(maps, masks)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.5, 0.5]))
    assert math.isnan(float(pixel_auc(maps[:1], torch.zeros(1, 2, 2, dtype=torch.bool))[0]))


def test_gate_contrast_by_hand() -> None:
    gates = torch.full((1, 2, 2), 0.2)
    gates[0, 0, 0] = 0.8
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # covers cell (0, 0) fully
    assert float(gate_contrast(gates, masks)[0]) == pytest.approx(4.0)
    masks[0, 2, 2] = True  # touches cell (1, 1) by a quarter: on the object, no longer empty
    assert float(gate_contrast(gates, masks)[0]) == pytest.approx(0.5 / 0.2)


# --------------------------------------------------------------------------- statistics


RULE = {"alpha": 0.05, "power": 0.8, "resamples": 400, "num_primaries": 1,
        "min_seeds_same_direction": 4}  # fmt: skip


def _values(diff: np.ndarray, metric: str = "grid_pointing_game") -> dict:
    """Seeds x images of ``a = b + diff`` with b random."""
    rng = np.random.default_rng(0)
    out = {}
    for s in range(diff.shape[0]):
        b = rng.normal(50, 10, diff.shape[1])
        out[s] = {"a": {metric: dict(enumerate(b + diff[s]))}, "b": {metric: dict(enumerate(b))}}
    return out


def test_a_constant_difference_is_estimated_exactly() -> None:
    c = A.compare(_values(np.full((5, 40), 3.0)), "a", "b", "grid_pointing_game", 2.0, RULE)
    assert c["estimate"] == pytest.approx(3.0)
    assert c["ci"] == pytest.approx([3.0, 3.0])
    assert c["seeds_a_better"] == 5 and c["n_pairs"] == 200
    assert A.endpoint_verdict(c, RULE) == "beats"


def test_lower_is_better_metrics_are_oriented() -> None:
    c = A.compare(_values(np.full((5, 40), 0.05), "deletion"), "a", "b", "deletion", 0.01, RULE)
    assert c["estimate"] == pytest.approx(-0.05)  # a deletes worse: a's AUC is higher
    assert A.endpoint_verdict(c, RULE) == "worse"


def test_crossed_bootstrap_counts_the_seed_variation() -> None:
    """Seed effects that vary widen the interval; a pure image bootstrap would not see them."""
    rng = np.random.default_rng(1)
    seed_shift = rng.normal(0, 3, (5, 1))
    d = 1.0 + seed_shift + rng.normal(0, 0.1, (5, 200))
    c = A.compare(_values(d), "a", "b", "grid_pointing_game", 2.0, RULE)
    assert c["se"] > 0.5  # ~ 3 / sqrt(5) = 1.3, far above the image noise 0.1 / sqrt(1000)
    assert A.endpoint_verdict(c, RULE) == "inconclusive"


def test_equivalence_needs_a_narrow_interval_inside_the_sesoi() -> None:
    rng = np.random.default_rng(2)
    tight = A.compare(_values(rng.normal(0, 0.5, (5, 160))), "a", "b", "grid_pointing_game",
                      2.0, RULE)  # fmt: skip
    assert A.endpoint_verdict(tight, RULE) == "equivalent"
    wide = A.compare(_values(rng.normal(0, 30, (5, 20))), "a", "b", "grid_pointing_game", 2.0,
                     RULE)  # fmt: skip
    assert A.endpoint_verdict(wide, RULE) == "inconclusive"
    assert wide["mde"] > 2.0 > tight["mde"]


def _cmp(metric: str, lo: float, hi: float, seeds: int = 5, sesoi: float = 1.0) -> dict:
    return {"a": "ag", "b": "gc", "metric": metric, "ci": [lo, hi], "ci90": [lo, hi],
            "sesoi": sesoi, "seeds_a_better": seeds, "n_seeds": 5}  # fmt: skip


def test_decision_rule() -> None:
    beaten = {"deletion": [_cmp("deletion", 0.5, 2.0) | {"b": "shuffled"}]}
    not_beaten = {"deletion": [_cmp("deletion", -0.5, 2.0) | {"b": "shuffled"}]}
    big = [_cmp("deletion", 1.5, 3.0), _cmp("average_drop", -0.2, 0.2)]
    assert A.decide(big, beaten, RULE)["verdict"] == "helps"
    assert A.decide(big, not_beaten, RULE)["verdict"] == "inconclusive"  # controls do as well
    few_seeds = [_cmp("deletion", 1.5, 3.0, seeds=3)]
    assert A.decide(few_seeds, beaten, RULE)["verdict"] == "inconclusive"
    small = [_cmp("deletion", 0.2, 0.8), _cmp("average_drop", -0.2, 0.2)]
    assert A.decide(small, beaten, RULE)["verdict"] == "does not help"
    mixed = [_cmp("deletion", 0.2, 0.8), _cmp("average_drop", -3.0, 0.2)]
    assert A.decide(mixed, beaten, RULE)["verdict"] == "inconclusive"


def test_testability_needs_one_measure_above_the_centre_prior() -> None:
    no = [_cmp("pointing_game", -5, 1), _cmp("pixel_auc", -0.1, 0.0)]
    assert not A.testability(no, {"ci": [0.9, 1.1]})["localises"]
    assert A.testability(no, {"ci": [1.1, 1.4]})["localises"]
    assert A.testability([*no, _cmp("energy_pointing_game", 0.5, 3)], {})["localises"]


def test_ratio_summary_is_a_geometric_mean() -> None:
    r = A.ratio_summary({0: {0: 2.0, 1: 8.0}, 1: {0: 2.0, 1: 8.0}}, 200)
    assert r["estimate"] == pytest.approx(4.0)
    assert r["n_pairs"] == 4


# --------------------------------------------------------------------------- settings


def test_arms_need_one_primary_and_known_keys() -> None:
    g = OmegaConf.create({"arms": {"a": {"role": "control"}}})
    with pytest.raises(ValueError, match="exactly one arm with role: primary"):
        arms(g)
    g = OmegaConf.create({"arms": {"a": {"role": "primary", "gama": 1}}})
    with pytest.raises(ValueError, match=r"unknown keys \['gama'\]"):
        arms(g)
    g = OmegaConf.create({"arms": {"a": {"role": "boss"}}})
    with pytest.raises(ValueError, match="role must be one of"):
        arms(g)
    g = OmegaConf.create({"arms": {"a": {"role": "primary", "gamma": 1.0, "seeds": [0, 1]}}})
    (arm,) = arms(g)
    assert arm.gamma == 1.0 and arm.extra["seeds"] == [0, 1]


def test_an_arm_without_seeds_is_left_out_but_the_primary_needs_one() -> None:
    g = OmegaConf.create(
        {"arms": {"p": {"role": "primary", "seeds": [0]}, "r": {"role": "recipe", "seeds": []}}}
    )
    assert [a.name for a in arms(g)] == ["p"]
    g = OmegaConf.create({"arms": {"p": {"role": "primary", "seeds": []}}})
    with pytest.raises(ValueError, match="needs at least one seed"):
        arms(g)


# --------------------------------------------------------------------------- the committed run


def test_committed_report_rerenders_from_its_json() -> None:
    """docs/REPRODUCTION.md is a pure function of the committed results.json and manifest.json."""
    from pathlib import Path

    from attncam.stages.reproduce.guidance import rerender

    docs = Path(__file__).resolve().parents[2] / "docs"
    committed = (docs / "REPRODUCTION.md").read_text()
    assert rerender(docs / "reproduction" / "guidance") == committed
    assert committed.index("## 1. Pre-registration") < committed.index("## 4. Verdict")
