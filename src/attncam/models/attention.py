"""Channel and spatial attention modules: CBAM, SE and BAM.

Every gate passes its map through an identity :class:`AttentionTap`, so the explain stage reads the
learned maps with the same forward-capture it uses for CAM activations; ``forward`` returns features
only. Defaults follow the official CBAM code (Jongchan/attention-module).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

ATTENTION_KINDS = ("none", "se", "cbam", "cbam_channel", "cbam_spatial", "bam")


class AttentionTap(nn.Identity):
    """Identity whose output is an attention map, found by ``AttentionNet.attention_taps()``.

    The explain engine recognises a tap by its ``is_attention_tap`` attribute and reads ``kind``
    (``attncam.explain.model_api``), so any module declaring both works as a tap.

    Args:
        kind: ``"channel"`` for maps of shape ``(B, C, 1, 1)`` or ``"spatial"`` for ``(B, 1, h, w)``.
    """

    #: The marker the explain engine looks for.
    is_attention_tap: ClassVar[bool] = True

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

    def from_descriptors(self, desc: torch.Tensor) -> torch.Tensor:
        """``M_c`` ``(B, C, 1, 1)`` from the stacked ``[avgpool F; maxpool F]`` ``(2B, C)``."""
        b = desc.shape[0] // 2
        out = self.mlp(desc)
        return self.tap(torch.sigmoid(out[:b] + out[b:])[..., None, None])


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
        return self.from_pooled(pooled)

    def from_pooled(self, pooled: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """``M_s`` ``(B, 1, h, w)`` from the pooled ``[max_c F'; mean_c F']`` ``(B, 2, h, w)``.

        Args:
            pooled: the two pooled maps.
            channels_last: run the conv in channels-last format (same values; oneDNN's
                2-to-1-channel 7x7 conv is about 2x faster so, forward and backward, on CPU).
        """
        if channels_last:
            fmt = torch.channels_last
            conv = torch.nn.functional.conv2d(
                pooled.contiguous(memory_format=fmt),
                self.conv.weight.contiguous(memory_format=fmt),
                None,
                self.conv.stride,
                self.conv.padding,
            )
        else:
            conv = self.conv(pooled)
        return self.tap(torch.sigmoid(self.bn(conv)))


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
        if (
            self.channel_gate is not None
            and self.spatial_gate is not None
            and _fused_path_ok(x, self.training)
        ):
            return self._forward_fused(x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The straightforward eq. 1, one autograd op at a time (eval, compile, fx)."""
        if self.channel_gate is not None:
            x = x * self.channel_gate(x)
        if self.spatial_gate is not None:
            x = x * self.spatial_gate(x)
        return x

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1 with the memory-bound passes of the backward pass fused (same values).

        The MLP, the 7x7 conv, BN and both sigmoids stay ordinary autograd ops and both maps
        still pass through their taps; only the pooling and gating of the full ``(B, C, h, w)``
        tensor are custom functions, which share one input-gradient buffer (see
        :class:`_FusedState`).
        """
        assert self.channel_gate is not None and self.spatial_gate is not None
        state = _FusedState()
        mc = self.channel_gate.from_descriptors(_ChannelPool.apply(x, state))
        pooled = _GatedSpatialPool.apply(x, mc, state)
        ms = self.spatial_gate.from_pooled(pooled, channels_last=x.device.type == "cpu")
        return _DoubleGate.apply(x, mc, ms, state)


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


# ------------------------------------------------------------------------------ fused CBAM
#
# The straightforward CBAM (``CBAM.forward_reference``) costs about 35 passes over the
# ``(B, C, h, w)`` tensor per training step: ``amax`` backward alone builds an equality mask, a
# count and a division, and autograd sums the input gradient of four branches. The three
# functions below compute the same forward values (the same ops on the same operands) and the
# same gradients (up to float summation order; at exact ties of a max the gradient goes to one
# element, as ``max(dim)`` does, instead of being split as ``amax`` does) in about 17 passes:
#
#   forward  desc = [mean_hw F; max_hw F]         -> MLP -> M_c          (_ChannelPool)
#            F' = M_c * F; [max_c F'; mean_c F']  -> conv, BN -> M_s     (_GatedSpatialPool)
#            F'' = F' * M_s  (in place on F')                            (_DoubleGate)
#   backward (run in reverse; dF = input gradient, g = dF'')
#            t = g * M_s; dM_s = M_c^T (g * F); dM_c += (g * F) M_s     (_DoubleGate)
#            t += dmean_c / C; t[argmax_c] += dmax_c; dM_c += ...         (_GatedSpatialPool)
#            dF = M_c * t + dmean_hw / hw; dF[argmax_hw] += dmax_hw        (_ChannelPool)
#
# so F is the only full-size tensor saved (F' is freed after the forward), and the input
# gradient is built once in a buffer handed from the last function's backward to the first's.


class _FusedState:
    """Input-gradient buffer handed between the backward passes of one fused CBAM call.

    ``t`` is tagged with the autograd graph task that wrote it, so a backward pass that runs
    only part of the CBAM graph (e.g. ``autograd.grad`` of ``M_s`` alone) never reads a buffer
    left by another pass.
    """

    def __init__(self) -> None:
        self.fprime: torch.Tensor | None = None
        self.mc: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.task = -1

    def put(self, t: torch.Tensor) -> None:
        self.t, self.task = t, _graph_task_id()

    def take(self) -> torch.Tensor | None:
        t, self.t = self.t, None
        return t if t is not None and self.task == _graph_task_id() else None


def _graph_task_id() -> int:
    """Id of the autograd graph task running now (-1 outside a backward pass)."""
    return torch._C._current_graph_task_id()  # noqa: SLF001 (no public equivalent in torch)


def _fused_path_ok(x: torch.Tensor, training: bool) -> bool:
    """Use the fused functions for plain training steps only (no compile or fx).

    Under autocast they run when ``x`` already has the autocast dtype (bf16-mixed: the
    backbone's conv and BN hand CBAM bf16 features), so both maps, computed by autocast's
    linear and conv, come out in that dtype too and every fused op sees one dtype.
    """
    if not (training and torch.is_grad_enabled()) or isinstance(x, torch.fx.Proxy):
        return False
    if torch.compiler.is_compiling():
        return False
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.get_autocast_dtype(dev):
        return False
    return x.dim() == 4 and x.is_floating_point()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` as ``(B, C, hw)``, a view for contiguous and channels-last tensors."""
    return x.flatten(2)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when :func:`_flat` gives a view of it (needed to scatter in place)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


#: Smallest ``h * w`` for which :func:`_max_over_channels` uses the pairwise tree (measured:
#: faster from 16 x 512 x 16 x 16 up, slower at 16 x 1024 x 8 x 8 and below).
_TREE_MIN_PIXELS = 256


def _max_over_channels(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_c f`` and an argmax, both ``(B, 1, h, w)``, as ``f.max(1, keepdim=True)`` gives.

    On large NCHW maps on CPU as a pairwise tree (channel ``j`` against ``j + n/2``, halving
    ``n``): ``max(dim)`` with indices reduces each pixel in a scalar loop over ``C`` (13 ms on
    a 16 x 256 x 32 x 32 map, 1 thread), the tree's ``maximum`` and ``>`` are vectorised over
    pixels (3.5 ms). The values are exact and the index is that of a maximum; at exact ties
    it may name another of the tied channels than ``max(dim)`` does (pairing neighbours
    instead keeps ``max(dim)``'s choice but measured 9.4 ms).
    """
    small = f.shape[1] < 2 or f.shape[2] * f.shape[3] < _TREE_MIN_PIXELS
    if small or f.device.type != "cpu" or not f.is_contiguous():  # measured on CPU only
        return f.max(1, keepdim=True)
    m, levels = f, []
    while m.shape[1] > 1:
        n = m.shape[1]
        h = n // 2
        a, b = m[:, :h], m[:, h : 2 * h]
        levels.append((b > a, h, n % 2 == 1))
        top = torch.maximum(a, b)
        m = torch.cat([top, m[:, 2 * h :]], 1) if n % 2 else top  # an odd last channel moves up
    idx = torch.zeros(m.shape, dtype=torch.long, device=m.device)
    for picked_b, h, odd in reversed(levels):  # position one level up -> position here
        down = idx + h * picked_b.gather(1, idx.clamp_max(h - 1))
        idx = torch.where(idx == h, 2 * h, down) if odd else down
    return m, idx


class _ChannelPool(torch.autograd.Function):
    """``[mean_hw F; max_hw F]`` ``(2B, C)``; its backward completes the input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: _FusedState) -> torch.Tensor:
        flat = _flat(x)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # The channels-last pooling kernel is vectorised over C: 4x faster than max(dim).
            mx, idx = torch.nn.functional.adaptive_max_pool2d(x, 1, return_indices=True)
            mx, idx = mx.flatten(1), idx.flatten(1)
        else:
            mx, idx = flat.max(-1)
        ctx.state, ctx.shape = state, x.shape
        ctx.save_for_backward(idx)
        return torch.cat([flat.mean(-1), mx], 0)

    @staticmethod
    def backward(ctx: Any, ddesc: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (idx,) = ctx.saved_tensors
        b, c, h, w = ctx.shape
        davg = (ddesc[:b] / (h * w))[..., None, None]
        t, mc = ctx.state.take(), ctx.state.mc
        if t is None:  # this pass does not reach the gates: only the pooling's gradient
            dx = _dense(davg.expand(b, c, h, w).clone())
        else:
            dx = _dense(torch.addcmul(davg, t, mc))
        _flat(dx).scatter_add_(2, idx[..., None], ddesc[b:, :, None])
        return dx, None


class _GatedSpatialPool(torch.autograd.Function):
    """``F' = M_c * F`` kept for :class:`_DoubleGate`; returns ``[max_c F'; mean_c F']``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mc: torch.Tensor, state: _FusedState) -> torch.Tensor:
        fprime = x * mc
        mx, idx = _max_over_channels(fprime)
        pooled = torch.cat([mx, fprime.mean(1, keepdim=True)], 1)
        state.fprime, state.mc = fprime, mc.detach()
        ctx.state = state
        ctx.save_for_backward(x, mc, idx)
        return pooled

    @staticmethod
    def backward(
        ctx: Any, dpooled: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, mc, idx = ctx.saved_tensors
        b, c, h, w = x.shape
        dmax, dmean = dpooled[:, :1], dpooled[:, 1:] / c
        dx = None
        if ctx.needs_input_grad[0]:
            t = ctx.state.take()
            t = _dense(dmean.expand(b, c, h, w).clone()) if t is None else t.add_(dmean)
            _flat(t).scatter_add_(1, _flat(idx), _flat(dmax))
            ctx.state.put(t)
        dmc = None
        if ctx.needs_input_grad[1]:
            xf = _flat(x)
            dmc = torch.bmm(xf, _flat(dmean).transpose(1, 2))  # (B, C, 1)
            picked = xf.gather(1, _flat(idx)) * _flat(dmax)  # (B, 1, hw)
            dmc = dmc.view(b, c).scatter_add_(1, _flat(idx)[:, 0], picked[:, 0])
            dmc = dmc.view(mc.shape)
        return dx, dmc, None


class _DoubleGate(torch.autograd.Function):
    """``F'' = F' * M_s`` (written over ``F'``); the backward starts the input gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, mc: torch.Tensor, ms: torch.Tensor, state: _FusedState
    ) -> torch.Tensor:
        fprime, state.fprime = state.fprime, None
        assert fprime is not None
        ctx.state = state
        ctx.save_for_backward(x, mc, ms)
        return fprime.mul_(ms)

    @staticmethod
    def backward(
        ctx: Any, g: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None]:
        x, mc, ms = ctx.saved_tensors
        b, c, h, w = x.shape
        dmc = dms = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gx = _flat(g * x)  # (B, C, hw)
            if ctx.needs_input_grad[1]:
                dmc = torch.bmm(gx, _flat(ms).transpose(1, 2)).view(mc.shape)
            if ctx.needs_input_grad[2]:
                dms = torch.bmm(mc.view(b, 1, c), gx).view(ms.shape)
        if ctx.needs_input_grad[0]:
            ctx.state.put(_dense(g * ms))
        # The input gradient is finished and returned by _ChannelPool.backward.
        return None, dmc, dms, None


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
