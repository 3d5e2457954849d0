"""attncam.explain.methods: one small registered class per explanation method."""

from attncam.explain.methods.registry import available_methods, build_method, get_method

__all__ = ["available_methods", "build_method", "get_method"]
