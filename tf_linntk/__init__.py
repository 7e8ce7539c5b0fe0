"""tf_linntk: fast adaptation of trained Keras networks with linearized models."""

from tf_linntk.autodiff import FunctionalModel
from tf_linntk.kernels import NTKOperator
from tf_linntk.linearize import LinearizedModel

__version__ = "0.1.0"

__all__ = [
    "FunctionalModel",
    "LinearizedModel",
    "NTKOperator",
    "__version__",
]
