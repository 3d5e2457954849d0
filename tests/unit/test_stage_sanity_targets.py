"""The explain stage's sanity check explains the run's images for the run's targets (``target=``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from attncam.stages import sanity as stage_sanity


def test_sanity_check_uses_the_explained_images_and_their_targets(monkeypatch: Any) -> None:
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 8, 8).clone()
    dataset = TensorDataset(images, torch.zeros(6, dtype=torch.long))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    seen: dict[str, torch.Tensor] = {}

    class Result:
        def compute(self) -> dict[str, Any]:
            return {}

    def fake(model: nn.Module, fn: Any, x: torch.Tensor, t: torch.Tensor, layers: Any,
             **_: Any) -> Result:  # fmt: skip
        seen["x"], seen["t"] = x, t
        return Result()

    monkeypatch.setattr(stage_sanity, "run_sanity_check", fake)
    specs = [("gradcam", {})]
    cfg = {"num_images": 2, "layers": ["0"]}
    stage_sanity.sanity_check(net, specs, "0", dataset, None, cfg, {}, [(4, 3), (1, 0), (2, 2)])
    # the first two explained images (ids 4 and 1), each for the run's target (3 and 0),
    # not the dataset's first images for the predicted class
    assert seen["x"][:, 0, 0, 0].tolist() == [4.0, 1.0]
    assert seen["t"].tolist() == [3, 0]
    stage_sanity.sanity_check(net, specs, "0", dataset, None, cfg, {})
    assert seen["x"][:, 0, 0, 0].tolist() == [0.0, 1.0]
    assert seen["t"].tolist() == net(images[:2]).argmax(1).tolist()
