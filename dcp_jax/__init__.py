"""dcp_jax: DCP-CLIP open-vocabulary semantic segmentation in JAX/Flax NNX."""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

# configs/ is installed as the package dcp_jax.configs (setuptools' package-dir). Run from a plain
# checkout (PYTHONPATH=checkout, as on an accelerator image whose jax must not be replaced), that
# package does not exist: make the checkout's configs/ it, so `from dcp_jax.configs import tiny` works
# both ways.
if _util.find_spec("dcp_jax.configs") is None:
    _configs = _Path(__file__).resolve().parent.parent / "configs"
    if (_configs / "__init__.py").is_file():
        _spec = _util.spec_from_file_location("dcp_jax.configs", _configs / "__init__.py",
                                              submodule_search_locations=[str(_configs)])
        _module = _util.module_from_spec(_spec)
        _sys.modules["dcp_jax.configs"] = _module
        _spec.loader.exec_module(_module)
