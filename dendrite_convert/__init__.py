"""dendrite_convert: add dendrites to any saved PyTorch model, train them, export plain inference artifacts."""

__version__ = "0.1.0"

from .conversion.convert import convert
from .conversion.config import DendriteConfig
from .exporting.export import ExportConfig, export
from .exporting.foldeddir import load_folded
from .core.errors import ConversionError, DendriteError, LoadError, UsageError, VerificationError
from .exporting.fold import fold_model
from .core.layers import DendriteLayer, count_parameters, dendrite_layers
from .conversion.modeldir import ConvertedModel, load, load_converted
from .training.trainer import TrainConfig, train

__all__ = [
    "ConversionError", "ConvertedModel", "DendriteConfig", "DendriteError", "DendriteLayer", "ExportConfig", "LoadError",
    "UsageError", "VerificationError", "__version__", "convert", "count_parameters", "dendrite_layers", "export",
    "fold_model", "load_folded",
    "load", "load_converted", "TrainConfig", "train",
]
