"""Built-in class-name lists of the standard benchmarks, as JSON package data.

Each list is identical in order and spelling to the one CAT-Seg and SED score with (their
`datasets/{coco,ade150,pc59,voc20,voc20b}.json`; index = label value). ADE-847 and PC-459 are not
built in: their names come from the dataset's own `classes.json` (see `dcp_jax.data.datasets`).

The lists were cross-checked against mmsegmentation 1.2.2's `mmseg/utils/class_names.py`
(ADE-150, PC-59, COCO-Stuff-171 and VOC-20 agree name for name). voc20b is the 20 VOC names
followed by the 39 PC-59 names that are not VOC classes (PC-59's `table` is VOC's `diningtable`).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

# sha256 of each JSON file: catches accidental edits (tests/test_data_classnames.py checks them).
SHA256 = {
    "ade150": "1e80d91fc0579adcebe44d991625277c909d41f9e57df147f32e9b55cac67fbc",
    "coco_stuff_171": "2577d573ecac40df7c2245b02b53d6268a44323f3b664d96b05368658abf2320",
    "pc59": "8fa4c944846990b8b5ad2b370caf60f4c262a12b64530d070f4ca10967d1c9b1",
    "voc20": "0dcbbf92909de3e6317130248bf1c901d40c34a875ac3972a1db9c9a9c581e24",
    "voc20b": "4cd33547d60a72b3fc4a6df15fcc312ee34256ec8884ed2eb02646600c7e3336",
}

BUILTIN = tuple(sorted(SHA256))


def _resource(name: str):
    return resources.files("dcp_jax.data").joinpath("classnames", f"{name}.json")


def file_sha256(name: str) -> str:
    """sha256 of the stored JSON file for a built-in list."""
    return hashlib.sha256(_resource(name).read_bytes()).hexdigest()


def load(name: str) -> list[str]:
    """Class names of a built-in benchmark vocabulary, index = label value.

    `name` is one of coco_stuff_171, ade150, pc59, voc20, voc20b.
    """
    if name not in SHA256:
        hint = ""
        if name in ("ade847", "pc459"):
            hint = (f" {name} names come from the dataset's classes.json "
                    f"(written by `python -m dcp_jax.data.prepare {name} ...`).")
        raise KeyError(f"no built-in class names for {name!r}; built-in lists: {', '.join(BUILTIN)}.{hint}")
    return json.loads(_resource(name).read_text(encoding="utf-8"))
