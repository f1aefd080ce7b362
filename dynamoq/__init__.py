"""dynamoq: DynaMo mixed-precision quantization for Mixture-of-Experts models on torchao."""
from . import data
from .adapters import UnsupportedModelError, moe_blocks
from .analysis import Analysis, AnalysisError, analyze
from .checkpoint import CheckpointError, load, save  # also registers quant_method "dynamoq" with transformers
from .config import DynaMoConfig
from .generated import self_generate
from .kernels import compile_options
from .packing import QuantizationError
from .quantize import moe_filter, quantize_
from .report import bits_report
from .switching import adapt_, revert_
from .tensors import DynaMoExperts, SwitchableLinear
from . import eval, models

__version__ = "0.1.0"
__all__ = ["DynaMoConfig", "quantize_", "moe_filter", "bits_report", "moe_blocks", "DynaMoExperts",
           "SwitchableLinear", "QuantizationError", "UnsupportedModelError", "save", "load", "CheckpointError", "Analysis", "AnalysisError", "analyze",
           "adapt_", "revert_", "compile_options", "self_generate"]
