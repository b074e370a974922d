"""Built-in vocabularies of the seven standard benchmarks, as JSON package data.

The published open-vocabulary numbers (CAT-Seg, SED, DCP-CLIP Table I) were scored with CAT-Seg's
`datasets/*.json` class lists, and a different name or order changes the text embeddings and so
the mIoU. The files in `classnames/` are those lists byte for byte (CAT-Seg, MIT licence, see
`classnames/LICENSE-CAT-Seg`); CAT-Seg's `coco.json` is stored as `coco_stuff_171.json`. Index =
label value. A name holding ", " lists synonyms (ade847), kept as one string as CAT-Seg does.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

# sha256 of each stored file: an accidental edit would silently change a vocabulary
# (tests/test_data_classnames.py also compares every file with CAT-Seg's, name for name).
SHA256 = {
    "ade150": "13acce5a2acf692d795841c0e5d66db8105bc2fbac99f4470e2ec4b5372ae15e",
    "ade847": "eefd744c873fafa42e74353a3e75d8abc6c67e1cc4e830923236b4d6b9449676",
    "coco_stuff_171": "0d1caff40f22c2f8de07c9d3016f2521dea096ae8b51889a12d3511bc33a18e7",
    "pc459": "cf64f1df183b191040c774ba97f3e4786dd31605f913a7cbd3abbcdf8d21baca",
    "pc59": "99bf900203f2c9ea2d08834924885c51d22f8ecd76df655ac44f74c3c0f4c217",
    "voc20": "e3885dd5a88e12dc2e383f4f2427583be9a5984f9ae0859403b35e5dd7829d6e",
    "voc20b": "3bca95a149e01af1039de3b8ff1b8ad15da45fe5128152b4ca109a8b8ca66d73",
}

BUILTIN = tuple(sorted(SHA256))


def _resource(name: str):
    return resources.files("dcp_jax.data").joinpath("classnames", f"{name}.json")


def load(name: str) -> list[str]:
    """Class names of a built-in benchmark vocabulary, index = label value.

    `name` is one of ade150, ade847, coco_stuff_171, pc459, pc59, voc20, voc20b. The file's
    checksum is verified, so an edited copy fails loudly instead of scoring another vocabulary.
    """
    if name not in SHA256:
        raise KeyError(f"no built-in class names for {name!r}; built-in lists: {', '.join(BUILTIN)}")
    data = _resource(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise ValueError(f"{_resource(name)} does not match its recorded sha256; reinstall dcp_jax "
                         "(the built-in vocabularies must equal CAT-Seg's lists)")
    return json.loads(data.decode("utf-8"))
