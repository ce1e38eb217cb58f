"""fmoe: serve Mixture-of-Experts language models with offloaded, predicted experts, losslessly."""

from . import kernels, models
from .errors import FmoeError

__version__ = "0.1.0"
__all__ = ["models", "kernels", "FmoeError", "__version__"]
