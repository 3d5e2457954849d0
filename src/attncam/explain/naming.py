"""Result names and their slugs.

A method's result name is its registry key with its non-default options as a suffix
(``gradcampp[torchcam020]``, ``scacam[channel_weight=fc]``, ``gradcam[counterfactual]``); it is the
key of :attr:`Explanation.maps <attncam.explain.explainer.Explanation.maps>`, of the metric tables
and of the figures. Its slug (:func:`slug`) is the same name with only the characters a
``torch.nn.ModuleDict`` key and an ``.npz`` array name accept, the key under which ``maps.npz``
stores the map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from attncam.runtime import slug  # noqa: F401  (re-exported: attncam.explain.slug)

V = TypeVar("V")

_MISSING = object()


def result_name(
    key: str,
    options: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> str:
    """The result name of method ``key`` run with ``options``.

    Options equal to their default are left out; a ``variant`` shows its value alone, a true flag
    its name alone, any other option ``name=value``; several are joined by commas in sorted
    order. ``("gradcampp", {"variant": "torchcam020"})`` is ``gradcampp[torchcam020]``.

    Args:
        key: the method's registry key.
        options: the options given to the method (not its defaults).
        defaults: the method's option defaults; None looks them up in the method registry.

    Returns:
        The name, e.g. ``"gradcam"`` or ``"scacam[channel_weight=fc]"``.

    Raises:
        ValueError: ``defaults`` is None and ``key`` is not a registered method.
    """
    if defaults is None:
        # Imported here: the registry imports the methods, whose base class names its results
        # with this function.
        from attncam.explain.methods.registry import get_method

        defaults = get_method(key).defaults
    parts = []
    for k in sorted(options or {}):
        v = (options or {})[k]
        if v == defaults.get(k, _MISSING):
            continue
        if k == "variant":
            parts.append(str(v))
        elif v is True:
            parts.append(k)
        else:
            parts.append(f"{k}={v}")
    return f"{key}[{','.join(parts)}]" if parts else key


def find_result(results: Mapping[str, V], name: str) -> V:
    """The entry of ``results`` stored under result name ``name`` or under its slug.

    Reads both in-memory results (keyed by name) and ``maps.npz`` files (keyed by slug), e.g.
    ``find_result(np.load("maps.npz"), "gradcampp[torchcam020]")``.

    Raises:
        KeyError: neither key is present; the message lists the keys that are.
    """
    for key in (name, slug(name)):
        if key in results:
            return results[key]
    raise KeyError(
        f"no result {name!r} (slug {slug(name)!r}); stored: {', '.join(sorted(map(str, results)))}"
    )


__all__ = ["find_result", "result_name", "slug"]
