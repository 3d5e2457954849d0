"""Toy models shared by the metrics tests (no tests here)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BoxModel(nn.Module):
    """Two classes: logit 0 = ``scale * sum`` of the pixels in a box (all channels), logit 1 = 0.

    Its evidence lives exactly in the box, so the box is the perfect map.
    """

    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)

    def __init__(self, box: tuple[int, int, int, int], scale: float = 1.0) -> None:
        super().__init__()
        self.box = box  # (y0, y1, x0, x1), exclusive ends
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        y0, y1, x0, x1 = self.box
        s = x[:, :, y0:y1, x0:x1].sum(dim=(1, 2, 3)) * self.scale + self.dummy
        return torch.stack([s, torch.zeros_like(s)], dim=1)

    def box_mask(self, b: int, h: int, w: int) -> Tensor:
        y0, y1, x0, x1 = self.box
        m = torch.zeros(b, h, w, dtype=torch.bool)
        m[:, y0:y1, x0:x1] = True
        return m


class CountingModel(nn.Module):
    """Wraps a model and counts images passed through it (and forward calls)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        self.calls += 1
        return self.model(x)


class TinyNet(nn.Module):
    """Small CNN classifier on normalised input (for torchcam comparisons)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class PixelModel(nn.Module):
    """Pixel-space wrapper: normalises internally, exposes ``input_mean``/``input_std``."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.input_mean, self.input_std = tuple(mean), tuple(std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def random_maps(b: int, h: int, w: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=g)
