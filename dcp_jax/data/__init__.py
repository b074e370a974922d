"""Data: dataset specs, preparation, pipelines, the toy world.

Importing the package plugs every dataset kind into `dcp_jax.data.sources.open_dataset`: image and label files
(`file_datasets`: the benchmarks and folder datasets) and TFDS datasets (`tfds_data`). `datasets`, the command
line that is run as `python -m`, is not imported here (runpy would then see it imported twice).
"""

from dcp_jax.data import file_datasets, tfds_data

__all__ = ["file_datasets", "tfds_data"]  # imported for their registration
