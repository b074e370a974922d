"""The CPU demo: a tiny random CLIP and a synthetic dataset written under the workdir.

    python -m dcp_jax.train --config configs/demo.py --workdir runs/demo

(the same as running the trainer without --config).
"""

from dcp_jax.default_config import get_config  # noqa: F401
