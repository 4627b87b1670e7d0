"""dendrite_convert: add dendrites to any saved PyTorch model, train them, export plain inference artifacts."""

__version__ = "0.1.0"

from .api import convert
from .config import DendriteConfig
from .export import ExportConfig, export
from .foldeddir import load_folded
from .errors import ConversionError, DendriteError, LoadError, UsageError, VerificationError
from .fold import fold_model
from .layers import DendriteLayer, count_parameters, dendrite_layers
from .modeldir import ConvertedModel, load, load_converted
from .trainer import TrainConfig, train

__all__ = [
    "ConversionError", "ConvertedModel", "DendriteConfig", "DendriteError", "DendriteLayer", "ExportConfig", "LoadError",
    "UsageError", "VerificationError", "__version__", "convert", "count_parameters", "dendrite_layers", "export",
    "fold_model", "load_folded",
    "load", "load_converted", "TrainConfig", "train",
]
