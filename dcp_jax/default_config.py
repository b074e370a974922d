"""The trainer's built-in default config: the CPU demo (same as configs/demo.py)."""

from dcp_jax.config import demo_config, parse_arg


def get_config(arg=None):
    parse_arg(arg)  # the demo takes no arguments; anything given is an error
    return demo_config()
