"""Which tensor Grad-CAM and each attention-guided variant explain, and the CAM grid's size.

A comparison of attention-guided Grad-CAM with Grad-CAM isolates the attention only when both
explain the same tensor (the attention module gates the CAM layer's output), and a pointing game
or a deletion curve measures the method only when the CAM grid has enough cells. The table-2 run
records both per explained network from its explain runs (:func:`cam_from_explain_manifest`);
for a run that predates that record, :func:`cam_geometry` derives them from the model code on the
``meta`` device (shapes only: no weights, no memory, well under a second per network).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attncam.explain import Explainer
from attncam.explain.hooks import INPUT_SUFFIX
from attncam.explain.naming import result_name
from attncam.models.net import AttentionNet
from attncam.stages.reproduce.names import AG_VARIANTS, PAPER_BASELINES

#: Grad-CAM, the reference of every attention-guided comparison.
GRADCAM = PAPER_BASELINES[0]


def _spec(name: str) -> tuple[str, dict[str, Any]]:
    """``attention_guided[spatial_product]`` -> ``("attention_guided", {"variant": ...})``."""
    key, _, variant = name.partition("[")
    return key, ({"variant": variant.rstrip("]")} if variant else {})


def cam_geometry(family: str, placement: str, image_size: int) -> dict[str, Any]:
    """The CAM layer, its grid and each attention-guided variant's tensor, from the model code.

    Args:
        family: A registered backbone (``resnet50``, ``googlenet``, ``vgg19``, ``tiny``, ...).
        placement: The CBAM placement the network was trained with (``blocks`` or ``last``).
        image_size: Side of the square input, in pixels.

    Returns:
        ``{"layer": the CAM layer, "grid": [h, w], "tensors": {variant: the tensor it explains}}``
        (a ``:input`` suffix: the module's input), ``"source": "model code"``.
    """
    with torch.device("meta"):
        net = AttentionNet(family, 2, attention="cbam", placement=placement)
    explainer = Explainer(net.eval(), [_spec(m) for m in (GRADCAM, *AG_VARIANTS)])
    sizes = explainer.layer_sizes((image_size, image_size))
    targets = explainer.target_layers()
    layer = explainer.layers[0]
    return {
        "layer": layer,
        "grid": list(sizes[layer]),
        "tensors": {m: targets[m][0] for m in AG_VARIANTS},
        "source": "model code",
    }


def cam_from_explain_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The same record as :func:`cam_geometry`, read from an explain run's ``manifest.json``."""
    layers = manifest["layers"]
    layer = manifest["layer"][0]
    per_method = layers["per_method"]
    return {
        "layer": layer,
        "grid": list(layers["sites"][layer]),
        "tensors": {m: per_method[m]["layers"][0] for m in AG_VARIANTS if m in per_method},
        "source": "explain run",
    }


def same_tensor(cam: Mapping[str, Any], variant: str) -> bool:
    """Whether ``variant`` explains the CAM layer itself or the CAM layer's output gated by
    attention (so it differs from Grad-CAM only by the attention).

    Not when the variant's tensor lies inside the CAM layer's module: with ``placement=blocks``
    on a residual network that is the residual branch of the last block, before the identity add.
    """
    site = str(cam["tensors"].get(variant, cam["layer"])).removesuffix(INPUT_SUFFIX)
    return site == cam["layer"] or not site.startswith(cam["layer"] + ".")


def control_name(cam: Mapping[str, Any], variant: str) -> str:
    """The result name of the explain stage's control row for ``variant``: Grad-CAM on the input
    of the attention module whose tensor the variant explains (``stages.design.control_specs``)."""
    site = str(cam["tensors"][variant])
    if not site.endswith(INPUT_SUFFIX) and site.split(".")[-1].startswith("attention"):
        site += INPUT_SUFFIX
    return result_name(GRADCAM, {"layer": site})


__all__ = [
    "GRADCAM",
    "cam_from_explain_manifest",
    "cam_geometry",
    "control_name",
    "same_tensor",
]
