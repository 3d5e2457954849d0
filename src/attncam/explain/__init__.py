"""attncam.explain: CAM-family explanations of any ``nn.Module`` classifier.

``Explainer(model, methods=[...], layer=None)(images, targets=None)`` returns ``{name: (B, H, W)}``
maps in [0, 1]. ``capture()`` (``hooks.py``) is the only place hooks are registered; each method is
a small registered class (``methods/``) whose key is its ``conf/method/<key>.yaml`` file name.
What the engine may read from a model is the ``ExplainableModel`` protocol (``model_api.py``);
result names and their ``maps.npz`` slugs are ``result_name`` and ``slug`` (``naming.py``).
captum's attributions (``integrated_gradients``, ``smoothgrad``, ``input_x_gradient``) run behind
the same call through ``captum_adapter.py``; captum is imported only when one is used.
"""

from attncam.explain.captum_adapter import (
    CHANNEL_REDUCTIONS,
    CaptumMethod,
    reduce_channels,
    require_captum,
)
from attncam.explain.equivalence import equivalent_methods, representatives
from attncam.explain.explainer import (
    Explainer,
    Explanation,
    explaining,
    methods_from_config,
    parse_methods,
)
from attncam.explain.hooks import capture, count_hooks, intervene
from attncam.explain.methods.base import normalize_maps
from attncam.explain.methods.registry import available_methods, build_method, get_method
from attncam.explain.model_api import AttentionTapLike, ExplainableModel, unknown_layer_error
from attncam.explain.naming import find_result, result_name, slug

__all__ = [
    "CHANNEL_REDUCTIONS",
    "AttentionTapLike",
    "CaptumMethod",
    "ExplainableModel",
    "Explainer",
    "Explanation",
    "available_methods",
    "build_method",
    "capture",
    "count_hooks",
    "equivalent_methods",
    "explaining",
    "find_result",
    "get_method",
    "intervene",
    "methods_from_config",
    "normalize_maps",
    "parse_methods",
    "reduce_channels",
    "require_captum",
    "result_name",
    "slug",
    "unknown_layer_error",
    "representatives",
]
