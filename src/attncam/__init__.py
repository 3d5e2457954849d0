"""attncam: trainable CBAM-style attention and attention-map-guided explanations of CNNs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attncam")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
