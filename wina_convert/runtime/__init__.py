"""Loading WINA checkpoints and running them sparse."""

from .loading import load
from .modules import GatedLinear, WinaDecoderLayer

__all__ = ["load", "GatedLinear", "WinaDecoderLayer"]
