"""The CBAM authors' released ImageNet checkpoints, loaded into :class:`AttentionNet`.

Woo et al. released ResNet-50 + CBAM and ResNet-50 + BAM trained on ImageNet with their code
(github.com/Jongchan/attention-module, ``MODELS/model_resnet.py``, ``cbam.py``, ``bam.py``), saved
from ``nn.DataParallel`` as ``{"state_dict": ..., "epoch", "arch", "best_prec1", "optimizer"}``
with every key prefixed ``module.``. Their network is a torchvision-style ResNet; CBAM sits in
every residual block after the last BN, before the identity add, and BAM after ``layer1`` to
``layer3`` (Park et al., BMVC 2018) -- the same places as ``AttentionNet(..., "cbam"|"bam",
placement="blocks")``, so a key mapping is all that is needed:

======================================================  ==========================================
their key (after ``module.``)                           AttentionNet key
======================================================  ==========================================
``conv1.*``, ``bn1.*``, ``layer<i>.<j>.<conv|bn>...``   ``features.`` + the same
``fc.*``                                                ``head.fc.*``
``layer<i>.<j>.cbam.ChannelGate.mlp.{1,3}.*``           ``...attention.channel_gate.mlp.{0,2}.*``
``layer<i>.<j>.cbam.SpatialGate.spatial.{conv,bn}.*``   ``...attention.spatial_gate.{conv,bn}.*``
``bam<i>.channel_att.gate_c.gate_c_{fc_0,bn_1,fc_final}``  ``features.attention_layer<i>.channel_mlp.{0,1,3}``
``bam<i>.spatial_att.gate_s.gate_s_<...>``               ``features.attention_layer<i>.spatial.<n>``
======================================================  ==========================================

Their BAM gates with ``1 + sigmoid(M_c * M_s)`` (a product of the two branches), where the BAM
paper's eq. 1-2 and :class:`~attncam.models.attention.BAM` use ``sigmoid(M_c + M_s)``; a network
built with ``weights_format="cbam_official"`` uses :class:`OfficialBAM`, the product form, so its
logits are the authors'. Checkpoints older than torch 0.4.1 lack the BN ``num_batches_tracked``
counters; they are left at 0 (they only matter for BN with ``momentum=None``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from attncam.models.attention import BAM
from attncam.models.backbones import (
    LoadedWeights,
    PretrainedWeightsUnavailable,
    file_weights_id,
)

#: Values of ``model.weights_format``: ``None`` (attncam / torchvision state dicts) or the
#: CBAM authors' checkpoints.
WEIGHTS_FORMATS = (None, "cbam_official")

#: The architectures the authors' code defines (``ResidualNet("ImageNet", depth, ...)``).
OFFICIAL_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
OFFICIAL_ATTENTION = ("cbam", "bam", "none")

_BAM_PARTS = {
    "channel_att.gate_c.gate_c_fc_0.": "channel_mlp.0.",
    "channel_att.gate_c.gate_c_bn_1.": "channel_mlp.1.",
    "channel_att.gate_c.gate_c_fc_final.": "channel_mlp.3.",
    "spatial_att.gate_s.gate_s_conv_reduce0.": "spatial.0.",
    "spatial_att.gate_s.gate_s_bn_reduce0.": "spatial.1.",
    "spatial_att.gate_s.gate_s_conv_di_0.": "spatial.3.",
    "spatial_att.gate_s.gate_s_bn_di_0.": "spatial.4.",
    "spatial_att.gate_s.gate_s_conv_di_1.": "spatial.6.",
    "spatial_att.gate_s.gate_s_bn_di_1.": "spatial.7.",
    "spatial_att.gate_s.gate_s_conv_final.": "spatial.9.",
}
_CBAM_PARTS = {
    "cbam.ChannelGate.mlp.1.": "attention.channel_gate.mlp.0.",
    "cbam.ChannelGate.mlp.3.": "attention.channel_gate.mlp.2.",
    "cbam.SpatialGate.spatial.conv.": "attention.spatial_gate.conv.",
    "cbam.SpatialGate.spatial.bn.": "attention.spatial_gate.bn.",
}
_BAM_KEY = re.compile(r"^bam(\d)\.(.*)$")


class OfficialBAM(BAM):
    """BAM as in the authors' code: ``F * (1 + sigmoid(M_c * M_s))`` (see the module docstring).

    Same parameters (and keys) as :class:`~attncam.models.attention.BAM`; the taps record
    ``sigmoid(M_c)`` as the channel map and the channel mean of the gate as the spatial map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate features ``x`` ``(B, C, h, w)``; same shape out."""
        mc = self.channel_mlp(x.mean((2, 3)))[..., None, None]  # (B, C, 1, 1)
        ms = self.spatial(x)  # (B, 1, h, w)
        gate = torch.sigmoid(mc * ms)
        self.channel_tap(torch.sigmoid(mc))
        self.spatial_tap(gate.mean(1, keepdim=True))
        return x + x * gate


def official_key(key: str) -> str:
    """The :class:`AttentionNet` key of one of the authors' state-dict keys.

    Args:
        key: e.g. ``"module.layer1.0.cbam.ChannelGate.mlp.1.weight"``.

    Returns:
        e.g. ``"features.layer1.0.attention.channel_gate.mlp.0.weight"``.
    """
    key = key.removeprefix("module.")
    if key.startswith("fc."):
        return "head." + key
    m = _BAM_KEY.match(key)
    if m:
        stage, rest = m.groups()
        for theirs, ours in _BAM_PARTS.items():
            if rest.startswith(theirs):
                rest = ours + rest.removeprefix(theirs)
                break
        return f"features.attention_layer{stage}.{rest}"
    for theirs, ours in _CBAM_PARTS.items():
        if theirs in key:
            key = key.replace(theirs, ours)
            break
    return "features." + key


def check_official(
    backbone: str, attention: str, placement: str, reduction: int, kernel_size: int
) -> None:
    """Raise unless the settings describe a network of the authors' code.

    Raises:
        ValueError: naming the setting and the values their code defines.
    """
    wrong = []
    if backbone not in OFFICIAL_BACKBONES:
        wrong.append(f"model {backbone!r} (choose one of: {', '.join(OFFICIAL_BACKBONES)})")
    if attention not in OFFICIAL_ATTENTION:
        wrong.append(f"attention {attention!r} (choose one of: {', '.join(OFFICIAL_ATTENTION)})")
    if attention != "none" and placement != "blocks":
        wrong.append(f"placement {placement!r} (choose: blocks)")
    if reduction != 16 or kernel_size != 7:
        wrong.append(f"reduction {reduction} / kernel_size {kernel_size} (choose: 16 / 7)")
    if wrong:
        raise ValueError(
            "weights_format='cbam_official' holds the CBAM authors' ResNets; unsupported: "
            + "; ".join(wrong)
        )


def use_official_modules(net: nn.Module) -> None:
    """Turn every BAM of ``net`` into :class:`OfficialBAM` (same parameters, the authors' gate)."""
    for m in net.modules():
        if type(m) is BAM:
            m.__class__ = OfficialBAM


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of one of the authors' checkpoint files, loaded weights-only.

    Raises:
        PretrainedWeightsUnavailable: missing, unreadable, or not a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise PretrainedWeightsUnavailable(f"model.weights={str(path)!r} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, code-carrying pickles
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} could not be loaded weights-only: {err}"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} holds no state dict (expected the authors' "
            "{'state_dict': ...} checkpoint)"
        )
    return obj


def load_official(net: nn.Module, path: str | Path, classifier: str) -> tuple[LoadedWeights, bool]:
    """Load the authors' checkpoint ``path`` into ``net`` through :func:`official_key`.

    Args:
        net: an ``AttentionNet`` built with the checkpoint's architecture.
        path: the ``.pth.tar`` file.
        classifier: dotted name of ``net``'s classifier; its weights are loaded only when its
            shape matches the checkpoint's (1000 ImageNet classes).

    Returns:
        The weights' identity, and whether the classifier was loaded.

    Raises:
        PretrainedWeightsUnavailable: keys or shapes that do not fit, naming a few of them.
    """
    mapped = {official_key(k): v for k, v in read_official(path).items()}
    own = net.state_dict()
    fc = [k for k in mapped if k.startswith(classifier + ".")]
    head_fits = all(k in own and own[k].shape == mapped[k].shape for k in fc)
    if not head_fits:
        mapped = {k: v for k, v in mapped.items() if k not in fc}
    unexpected = sorted(set(mapped) - set(own))
    missing = sorted(
        k
        for k in set(own) - set(mapped)
        if not k.endswith("num_batches_tracked") and (head_fits or not k.startswith(classifier))
    )
    bad = [k for k in mapped if k in own and own[k].shape != mapped[k].shape]
    if unexpected or missing or bad:
        raise PretrainedWeightsUnavailable(
            f"model.weights={str(path)!r} (weights_format=cbam_official) does not fit this "
            f"network: missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes "
            f"{bad[:4]}. Their checkpoints are ResNet-50 with attention=cbam or attention=bam, "
            "placement=blocks"
        )
    net.load_state_dict(mapped, strict=False)
    return LoadedWeights(f"cbam_official:{file_weights_id(path)}"), head_fits


__all__ = [
    "OFFICIAL_ATTENTION",
    "OFFICIAL_BACKBONES",
    "WEIGHTS_FORMATS",
    "OfficialBAM",
    "check_official",
    "load_official",
    "official_key",
    "read_official",
    "use_official_modules",
]
