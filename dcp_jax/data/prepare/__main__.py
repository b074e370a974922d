"""`python -m dcp_jax.data.prepare BENCHMARK --raw DIR [--out DIR] ...` (see `dcp_jax.data.prepare.cli`)."""

import sys

from dcp_jax.data.prepare.cli import main

if __name__ == "__main__":
    sys.exit(main())
