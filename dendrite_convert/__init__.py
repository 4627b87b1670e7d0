"""dendrite_convert: add dendrites to any saved PyTorch model, train them, export plain inference artifacts."""

__version__ = "0.1.0"

from .api import convert
from .config import DendriteConfig
from .errors import ConversionError, DendriteError, LoadError, UsageError, VerificationError
from .layers import DendriteLayer, count_parameters, dendrite_layers
from .modeldir import ConvertedModel, load, load_converted

__all__ = [
    "ConversionError", "ConvertedModel", "DendriteConfig", "DendriteError", "DendriteLayer", "LoadError",
    "UsageError", "VerificationError", "__version__", "convert", "count_parameters", "dendrite_layers",
    "load", "load_converted",
]
