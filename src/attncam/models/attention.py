"""Channel and spatial attention modules: CBAM, SE and BAM.

Every gate passes its map through an identity :class:`AttentionTap`, so the explain stage reads the
learned maps with the same forward-capture it uses for CAM activations; ``forward`` returns features
only. Defaults follow the official CBAM code (Jongchan/attention-module).
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_KINDS = ("none", "se", "cbam", "cbam_channel", "cbam_spatial", "bam")


class AttentionTap(nn.Identity):
    """Identity whose output is an attention map, found by ``AttentionNet.attention_taps()``.

    Args:
        kind: ``"channel"`` for maps of shape ``(B, C, 1, 1)`` or ``"spatial"`` for ``(B, 1, h, w)``.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("channel", "spatial"):
            raise ValueError(f"unknown tap kind {kind!r}; choose one of: channel, spatial")
        self.kind = kind

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def _hidden(channels: int, reduction: int) -> int:
    return max(channels // reduction, 1)


class ChannelGate(nn.Module):
    """CBAM channel attention ``M_c = sigmoid(MLP(avgpool F) + MLP(maxpool F))`` (Woo et al., eq. 2).

    One MLP ``C -> C/r -> ReLU -> C`` is shared by both pooled descriptors.

    Args:
        channels: ``C``.
        reduction: ``r`` (16 in the paper).
        pools: which descriptors to sum; ``("avg",)`` gives the SE gate.
    """

    def __init__(
        self, channels: int, reduction: int = 16, pools: tuple[str, ...] = ("avg", "max")
    ) -> None:
        super().__init__()
        for p in pools:
            if p not in ("avg", "max"):
                raise ValueError(f"unknown pool {p!r}; choose from: avg, max")
        self.pools = tuple(pools)
        hidden = _hidden(channels, reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.tap = AttentionTap("channel")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid channel scores ``(B, C)`` of features ``x`` ``(B, C, h, w)``."""
        b, c = x.shape[:2]
        flat = x.flatten(2)
        if self.pools == ("avg", "max"):
            # One MLP call on both descriptors stacked: half the kernel launches.
            desc = torch.cat([flat.mean(-1), flat.amax(-1)], 0)
            out = self.mlp(desc)
            return out[:b] + out[b:]
        total = torch.zeros(b, c, dtype=x.dtype, device=x.device)
        for p in self.pools:
            total = total + self.mlp(flat.mean(-1) if p == "avg" else flat.amax(-1))
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the channel map ``M_c`` ``(B, C, 1, 1)`` in ``(0, 1)``."""
        return self.tap(torch.sigmoid(self.logits(x))[..., None, None])


class SpatialGate(nn.Module):
    """CBAM spatial attention ``M_s = sigmoid(BN(conv7x7([max_c F'; mean_c F'])))`` (eq. 3).

    The conv has no bias and the BN weight starts at 0, so ``M_s`` is 0.5 everywhere at
    initialisation (official CBAM code), and a pretrained network is only uniformly scaled.

    Args:
        kernel_size: 7 in the paper.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        nn.init.zeros_(self.bn.weight)
        self.tap = AttentionTap("spatial")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the spatial map ``M_s`` ``(B, 1, h, w)`` in ``(0, 1)``."""
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return self.tap(torch.sigmoid(self.bn(self.conv(pooled))))


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018, eq. 1).

    ``F' = M_c(F) * F``, ``F'' = M_s(F') * F'``; channel first.

    Args:
        channels: ``C`` of the features it gates.
        reduction: MLP reduction ratio ``r``.
        kernel_size: spatial conv size.
        channel: keep the channel gate (``cbam_spatial`` sets False).
        spatial: keep the spatial gate (``cbam_channel`` sets False).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        kernel_size: int = 7,
        channel: bool = True,
        spatial: bool = True,
    ) -> None:
        super().__init__()
        if not (channel or spatial):
            raise ValueError("CBAM needs at least one of the channel and spatial gates")
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction) if channel else None
        self.spatial_gate = SpatialGate(kernel_size) if spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate features ``x`` ``(B, C, h, w)``; same shape out."""
        if self.channel_gate is not None:
            x = x * self.channel_gate(x)
        if self.spatial_gate is not None:
            x = x * self.spatial_gate(x)
        return x


class SE(nn.Module):
    """Squeeze-and-Excitation: ``x * sigmoid(MLP(avgpool x))`` (Hu et al., CVPR 2018).

    Args:
        channels: ``C``.
        reduction: ``r`` (16).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction, pools=("avg",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate features ``x`` ``(B, C, h, w)``; same shape out."""
        return x * self.channel_gate(x)


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., BMVC 2018): ``F + F * sigmoid(M_c + M_s)``.

    ``M_c`` is an MLP on the average-pooled descriptor (with BN); ``M_s`` a 1x1 reduction, two
    dilated 3x3 convs (dilation 4) and a 1x1 projection to one channel. Both broadcast to
    ``(B, C, h, w)`` before the sum. The combined gate is tapped as a spatial map (its channel
    mean) and the channel branch as a channel map.

    Args:
        channels: ``C``.
        reduction: ``r`` (16).
        dilation: of the spatial branch (4).
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        self.channels = channels
        hidden = _hidden(channels, reduction)
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )
        self.channel_tap = AttentionTap("channel")
        self.spatial_tap = AttentionTap("spatial")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate features ``x`` ``(B, C, h, w)``; same shape out."""
        mc = self.channel_mlp(x.mean((2, 3)))[..., None, None]
        ms = self.spatial(x)
        gate = torch.sigmoid(mc + ms)
        self.channel_tap(torch.sigmoid(mc))
        self.spatial_tap(gate.mean(1, keepdim=True))
        return x + x * gate


def make_attention(
    kind: str, channels: int, reduction: int = 16, kernel_size: int = 7
) -> nn.Module:
    """Build one attention module by registry key.

    Args:
        kind: one of :data:`ATTENTION_KINDS` except ``"none"``.
        channels: channels of the features it gates.
        reduction: MLP reduction ratio.
        kernel_size: CBAM spatial conv size.

    Returns:
        The module; it maps ``(B, C, h, w)`` to the same shape.
    """
    if kind == "cbam":
        return CBAM(channels, reduction, kernel_size)
    if kind == "cbam_channel":
        return CBAM(channels, reduction, kernel_size, spatial=False)
    if kind == "cbam_spatial":
        return CBAM(channels, reduction, kernel_size, channel=False)
    if kind == "se":
        return SE(channels, reduction)
    if kind == "bam":
        return BAM(channels, reduction)
    raise ValueError(f"unknown attention {kind!r}; choose one of: {', '.join(ATTENTION_KINDS)}")


__all__ = [
    "ATTENTION_KINDS",
    "BAM",
    "CBAM",
    "SE",
    "AttentionTap",
    "ChannelGate",
    "SpatialGate",
    "make_attention",
]
