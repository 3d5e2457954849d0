"""Methods that give the same map by construction at their layer, found before any forward pass.

At a layer whose output ``A`` feeds global average pooling and then one linear classifier, with
nothing spatial in between (``y^c = (1/Z) sum_k W[c, k] sum_ij A^k_ij + b_c``), the gradient is the
same at every position, ``g^k_ij = W[c, k] / Z``, whatever the input. Then (SCA-CAM paper eq. 6;
docs/METHODS.md):

* Grad-CAM (``w_k = mean g = W[c, k] / Z``), HiResCAM (pixel weights ``g^k_ij = W[c, k] / Z``),
  XGrad-CAM (``sum_ij A^k_ij / sum_ab A^k_ab`` sums to 1, so ``w_k = W[c, k] / Z``; a channel whose
  activations sum to 0 gets 0, and after a ReLU such a channel is all zero anyway), CAM
  (``w_k = W[c, k]``) and the attention-guided Grad-CAM's ``cbam_output`` variant (Grad-CAM at the
  last CBAM module's output, when that output is the pooled one) all give
  ``ReLU(sum_k W[c, k] A^k)`` up to a positive factor, so the same normalised map. With
  ``counterfactual=True`` the gradient methods give ``ReLU(-sum_k W[c, k] A^k)``, again the same.
* Smooth Grad-CAM++ (``variant=formula``: the clean image's activations, the noisy inputs'
  ``g, g^2, g^3`` averaged) equals Grad-CAM++ with ``eps=0``: every noisy gradient is the clean one.
* SCA-CAM with ``channel_weight=grad`` (``alpha_k = mean g``) and ``channel_weight=fc``
  (``alpha_k = W[c, k]``) differ by the factor ``Z`` (``counterfactual`` flips the sign of the
  ``fc`` variant only, since ``grad`` negates both factors).
* Guided Grad-CAM built on two methods that coincide coincides too (same ``variant``).

A layer feeds the GAP -> linear head when the model says so (``AttentionNet``: ``gap_fc`` is True
and the layer is ``head_input_layer``, or a ``Sequential`` around it, or the last child of one it
ends with: the same tensor); any other model can name that layer with ``head_input_layer=``.
Nothing is inferred from a model that says nothing: no group is reported there.

Such duplicates are one piece of evidence, not several: the Explainer logs the groups once
(INFO), and a report can footnote them and score each group once (:func:`representatives`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from torch import nn

from attncam.explain import model_api
from attncam.explain.methods.base import Method, default_layers

if TYPE_CHECKING:
    from attncam.explain.explainer import MethodsArg

log = logging.getLogger(__name__)

#: Methods whose map at a GAP -> linear layer is ``ReLU(sign * sum_k W[c, k] A^k)``.
FC_WEIGHTED = ("gradcam", "hirescam", "xgradcam")


def gap_fc_layers(model: nn.Module, head_input_layer: str | None = None) -> set[str]:
    """Dotted names whose output is the tensor pooled by a GAP -> linear head.

    Args:
        model: the network.
        head_input_layer: the layer feeding global average pooling -> one linear layer; None reads
            ``model.head_input_layer`` when ``model.gap_fc`` is True.

    Returns:
        The layer and every name that outputs the same tensor (``Sequential`` ancestors it ends,
        the ``Sequential`` children it ends with); empty when the model names no such layer.
    """
    if head_input_layer is None:
        if model_api.gap_fc(model) is not True:
            return set()
        head_input_layer = model_api.head_input_layer(model)
        if not head_input_layer:
            return set()
    names = {head_input_layer}
    parts = head_input_layer.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        children = list(parent.named_children())
        if not isinstance(parent, nn.Sequential) or children[-1][0] != parts[i]:
            break
        names.add(".".join(parts[:i]))
    module, name = model.get_submodule(head_input_layer), head_input_layer
    while isinstance(module, nn.Sequential) and len(module) > 0:
        child, module = list(module.named_children())[-1]
        name = f"{name}.{child}"
        names.add(name)
    return names


def _sign(m: Method) -> int:
    return -1 if m.options.get("counterfactual") else 1


def _own_classifier(m: Method, model: nn.Module) -> bool:
    given = m.options.get("classifier")
    return given is None or given == (model_api.classifier_name(model) or given)


def _form(m: Method, model: nn.Module, layers: list[str], gap: set[str]) -> Hashable | None:
    """What ``m`` computes at a GAP -> linear layer, as a comparable key (None: nothing shared)."""
    key, opts = m.key, m.options
    if key in (*FC_WEIGHTED, "cam", "gradcampp", "smoothgradcampp", "scacam"):
        if not all(layer in gap for layer in m.layers(layers, model)):
            return None
    if key in FC_WEIGHTED:
        return ("fc_weighted", _sign(m))
    if key == "cam":
        return ("fc_weighted", 1) if _own_classifier(m, model) else None
    if key == "attention_guided" and opts["variant"] == "cbam_output":
        from attncam.explain.methods.attention import attention_modules

        names = attention_modules(model)
        return ("fc_weighted", _sign(m)) if names and names[-1] in gap else None
    if key == "gradcampp" and opts["variant"] == "formula":
        return ("gradcampp", _sign(m), float(opts["eps"]))
    if key == "smoothgradcampp" and opts["variant"] == "formula":
        return ("gradcampp", _sign(m), 0.0)
    if key == "scacam":
        if opts["channel_weight"] == "fc":
            return ("scacam", _sign(m)) if _own_classifier(m, model) else None
        return ("scacam", 1)
    if key == "guided_gradcam":
        inner = _form(m.inner, model, layers, gap)
        return ("guided_gradcam", opts["variant"], inner) if inner is not None else None
    return None


def equivalent_methods(
    model: nn.Module,
    methods: MethodsArg | Sequence[Method],
    layer: str | list[str] | None = None,
    *,
    head_input_layer: str | None = None,
) -> list[list[str]]:
    """Groups of methods whose maps are identical by construction at their layers.

    Example: on an ``AttentionNet`` ResNet (``cam_layer`` = ``head_input_layer`` =
    ``features.layer4``), ``["gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "hirescam",
    "cam"]`` gives ``[["gradcam", "xgradcam", "hirescam", "cam"], ["gradcampp",
    "smoothgradcampp"]]``.

    Args:
        model: the network the methods explain.
        methods: anything :class:`~attncam.explain.Explainer` accepts (keys, ``(key, options)``
            pairs, ...), or built :class:`~attncam.explain.methods.base.Method` objects.
        layer: the Explainer's CAM layer(s); None means ``model.cam_layer``.
        head_input_layer: the layer feeding GAP -> linear, for a model that does not say (see
            :func:`gap_fc_layers`).

    Returns:
        Groups of two or more result names (as in ``Explainer.names``), each in the given method
        order, the groups ordered by their first member; empty when nothing coincides.
    """
    from attncam.explain.explainer import parse_methods

    if isinstance(methods, Sequence) and methods and all(isinstance(m, Method) for m in methods):
        built: list[Method] = list(methods)  # type: ignore[arg-type]
    else:
        built = parse_methods(methods)  # type: ignore[arg-type]
    gap = gap_fc_layers(model, head_input_layer)
    if not gap:
        return []
    layers = default_layers(model, layer)
    groups: dict[Hashable, list[str]] = {}
    for m in built:
        form = _form(m, model, layers, gap)
        if form is not None:
            groups.setdefault(form, []).append(m.name)
    return [g for g in groups.values() if len(g) > 1]


def representatives(groups: list[list[str]]) -> dict[str, str]:
    """``{duplicate: first member of its group}`` for every method but the first of each group.

    A report can compute the metrics of the first member only and copy them to the others (their
    maps are the same), e.g. the perturbation forwards of Average Drop or deletion/insertion.
    """
    return {name: g[0] for g in groups for name in g[1:]}


def describe(groups: list[list[str]]) -> str:
    """One line for a log or a table footnote, e.g. ``"gradcam = xgradcam = cam; ..."``."""
    return "; ".join(" = ".join(g) for g in groups)


def log_groups(
    groups: list[list[str]], model: nn.Module, head_input_layer: str | None = None
) -> None:
    """Log the groups once at INFO, naming the pooled layer (nothing when there are none)."""
    if not groups:
        return
    where = head_input_layer or model_api.head_input_layer(model) or "the pooled layer"
    log.info(
        "methods identical by construction at %s, which feeds global average pooling and one "
        "linear layer: %s (one piece of evidence each, not several)",
        where,
        describe(groups),
    )


__all__ = [
    "FC_WEIGHTED",
    "describe",
    "equivalent_methods",
    "gap_fc_layers",
    "log_groups",
    "representatives",
]
