"""fmoe: serve Mixture-of-Experts language models with offloaded, predicted experts, losslessly."""

from .errors import FmoeError

__version__ = "0.1.0"
__all__ = ["models", "kernels", "FmoeError", "__version__"]


def __getattr__(name):
    # `fmoe.models` and `fmoe.kernels` load on first use: `import fmoe` (and the `fmoe`
    # command's --help and argument errors) does not wait for torch
    if name in ("models", "kernels"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
