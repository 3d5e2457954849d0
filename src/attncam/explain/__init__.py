"""attncam.explain: CAM-family explanations of any ``nn.Module`` classifier.

``Explainer(model, methods=[...], layer=None)(images, targets=None)`` returns ``{name: (B, H, W)}``
maps in [0, 1]. ``capture()`` (``hooks.py``) is the only place hooks are registered; each method is
a small registered class (``methods/``) whose key is its ``conf/method/<key>.yaml`` file name.
"""

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

__all__ = [
    "Explainer",
    "Explanation",
    "available_methods",
    "build_method",
    "capture",
    "count_hooks",
    "equivalent_methods",
    "explaining",
    "get_method",
    "intervene",
    "methods_from_config",
    "normalize_maps",
    "parse_methods",
    "representatives",
]
