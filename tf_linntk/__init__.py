"""tf_linntk: fast adaptation of trained Keras networks with linearized models."""

import logging

from tf_linntk import fisher
from tf_linntk import layers
from tf_linntk import likelihoods
from tf_linntk import metrics
from tf_linntk import preconditioners
from tf_linntk import solvers
from tf_linntk.autodiff import FunctionalModel
from tf_linntk.fisher import FisherOperator
from tf_linntk.kernels import NTKOperator
from tf_linntk.layers import LinearizedOutput
from tf_linntk.layers import PredictiveHead
from tf_linntk.likelihoods import Bernoulli
from tf_linntk.likelihoods import Categorical
from tf_linntk.likelihoods import Gaussian
from tf_linntk.linearize import LinearizedModel
from tf_linntk.similarity import jacobian_similarity
from tf_linntk.solvers import ConvergenceError
from tf_linntk.solvers import ConvergenceRecord
from tf_linntk.solvers import ConvergenceWarning

__version__ = "0.1.0"

# The Python logging HOWTO advises libraries to add only a NullHandler. It prints
# nothing, so without logging configured by the application, WARNING records no
# longer reach stderr next to the ConvergenceWarning that reports the same event.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Bernoulli",
    "Categorical",
    "ConvergenceError",
    "ConvergenceRecord",
    "ConvergenceWarning",
    "FisherOperator",
    "FunctionalModel",
    "Gaussian",
    "LinearizedModel",
    "LinearizedOutput",
    "NTKOperator",
    "PredictiveHead",
    "__version__",
    "fisher",
    "jacobian_similarity",
    "layers",
    "likelihoods",
    "metrics",
    "preconditioners",
    "solvers",
]
