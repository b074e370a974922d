"""Parameter paths and regex rules over them: the one way parameter groups are named.

A parameter's path is its `nnx.state` path joined with "/", e.g.
`clip/vision_model/encoder/layers/3/self_attn/q_proj/kernel` or `decoder/layers/0/up/kernel`.
Rules are `(regex, value)` pairs searched in order with `re.search`; the first match wins. The
optimizer groups (`config.optim.rules`) and the parameter shardings (`config.mesh.shard_rules`)
are both rule lists. Rules are searched, not anchored, so a rule written for a parameter also
matches the optimizer-state leaves that mirror it (`opt_state/.../mu/clip/...`).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from flax import nnx


def path_str(path) -> str:
    """An nnx path tuple or a jax key path -> "a/b/0/c".

    jax key paths into an nnx.State end in the Variable's own attribute (".value"); it is dropped, so
    optax's view of a parameter (e.g. in `multi_transform` labels) has the parameter's name.
    """
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):  # jax DictKey / GetAttrKey / SequenceKey
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    if parts and parts[-1] in ("value", "raw_value") and not isinstance(path[-1], str):
        parts.pop()
    return "/".join(parts)


def flat_params(tree) -> list[tuple[str, nnx.Variable]]:
    """(path string, variable) for every nnx.Param of a module or state."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    return [(path_str(p), v) for p, v in nnx.to_flat_state(state)]


def check_rules(rules: Sequence, what: str) -> tuple[tuple[str, Any], ...]:
    """Validate a rule list (pairs with a compilable regex); returns it as a tuple of pairs."""
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"{what}[{i}] = {rule!r}: a rule is a pair (regex, value)")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"{what}[{i}]: {rule[0]!r} is not a valid regex ({e})") from e
        out.append((rule[0], rule[1]))
    return tuple(out)


def first_match(rules: Iterable[tuple[str, Any]], path: str, what: str) -> tuple[int, Any]:
    """(index, value) of the first rule whose regex is found in `path`; no match is an error."""
    for i, (regex, value) in enumerate(rules):
        if re.search(regex, path):
            return i, value
    raise ValueError(f"no rule of {what} matches the parameter {path!r}; end the list with a catch-all "
                     "rule ('.*', ...)")
