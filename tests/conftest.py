"""Test-wide setup: 4 simulated CPU devices, absl flags marked parsed (grain workers need it)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
