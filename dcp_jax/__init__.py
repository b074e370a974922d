"""dcp_jax: DCP-CLIP open-vocabulary semantic segmentation in JAX/Flax NNX."""

__version__ = "0.1.0"
