"""Registry of explanation methods: key (= ``conf/method/<key>.yaml``) -> class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attncam.explain.methods.base import Method

_METHODS: dict[str, type[Method]] = {}

# The order of the methods table in docs/METHODS.md, used by available_methods() and "all".
ORDER = (
    "featuremap", "cam", "gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam",
    "hirescam", "scacam", "scorecam", "sscam", "iscam", "ablationcam", "eigencam", "attention",
    "attention_guided", "guided_backprop", "guided_gradcam", "occlusion", "integrated_gradients",
    "smoothgrad", "input_x_gradient",
)  # fmt: skip


def register_method(key: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a :class:`Method` subclass under ``key``."""

    def deco(cls: type[Method]) -> type[Method]:
        if key in _METHODS:
            raise ValueError(f"method {key!r} is already registered")
        cls.key = key
        _METHODS[key] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    """Registered keys, in the order of the methods table in docs/METHODS.md."""
    _load()
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(_METHODS, key=lambda k: (rank.get(k, len(ORDER)), k))


def get_method(key: str) -> type[Method]:
    """The class registered under ``key``, with an error listing the valid keys."""
    _load()
    try:
        return _METHODS[key]
    except KeyError:
        raise ValueError(
            f"unknown method {key!r}; choose one of: {', '.join(available_methods())}"
        ) from None


def build_method(key: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate method ``key`` with ``options`` (validated against its defaults)."""
    return get_method(key)(**(options or {}))


def _load() -> None:
    # Importing the modules registers their methods (kept lazy to avoid import cycles).
    from attncam.explain.methods import (  # noqa: F401
        activation,
        attention,
        attribution,
        gradient,
        guided,
        perturbation,
    )


__all__ = ["ORDER", "available_methods", "build_method", "get_method", "register_method"]
