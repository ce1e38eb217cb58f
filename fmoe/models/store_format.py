"""Moved to `fmoe.io.store_format`; this old path stays importable.

The old name is bound to the same module object, not to a copy of its names, so that code which
patches a module global (a test setting `BOUNCE_BYTES`, say) reaches the one the reader uses.
"""

import sys

from ..io import store_format as _moved

sys.modules[__name__] = _moved
