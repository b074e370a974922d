"""Run configs (ml_collections `get_config(arg)` files), installed as the package `dcp_jax.configs`.

Load one on the command line with `--config configs/NAME.py[:ARGS]`, or in Python with
`from dcp_jax.configs import NAME; NAME.get_config("ARGS")`.
"""
