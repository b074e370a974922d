"""Class-name lists, read by one set of rules wherever a vocabulary enters: predict's --classes and
--classes-file, a folder dataset's classes.json, the page's vocabulary box.

- Text is decoded as UTF-8 with or without a byte-order mark (Windows Notepad writes one).
- Text that starts with `[` or `{` is JSON: a list of strings is the vocabulary; anything else (an object, a
  number, invalid JSON) is an error that says what was found.
- Other text with several non-empty lines is one class per line ("building, edifice" is one class with a
  synonym); a single line is comma-separated ("cat, dog, grass").
- Names are stripped of surrounding spaces; empty entries are dropped from free text (where a stray comma or
  blank line makes them) and refused in classes.json, where a name's position is its label value.
- A name given twice (ignoring case and spaces) is refused: two slots of one class would split its pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

BOM = "\ufeff"


def key(name: str) -> str:
    """The form two names are compared in: lower case, runs of spaces as one."""
    return " ".join(name.lower().split())


def parse(text: str, *, where: str) -> list[str]:
    """A vocabulary from free text (see the module docstring); `where` names its source in errors."""
    text = text[len(BOM):] if text.startswith(BOM) else text
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        names = json_list(stripped, where=where)
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        names = lines if len(lines) > 1 else text.split(",")
    return check([n.strip() for n in names if n.strip()], where=where)


def json_list(text: str, *, where: str) -> list[str]:
    """A JSON list of strings, or a ValueError that says what the JSON held instead."""
    text = text[len(BOM):] if text.startswith(BOM) else text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); give a JSON list of class names, or one name per "
                         "line") from None
    if not isinstance(value, list):
        raise ValueError(f"{where}: holds a JSON {type(value).__name__}, not a list; give a JSON list of class "
                         'names such as ["cat", "dog"], or one name per line')
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{where}: entries that are not class names: {bad[:5]}; give strings")
    return value


def check(names: list[str], *, where: str) -> list[str]:
    """`names` (already stripped), refusing an empty list and a name given twice."""
    if not names:
        raise ValueError(f"{where} is empty: give at least one class name")
    keys = [key(n) for n in names]
    repeated = sorted({names[i] for i, k in enumerate(keys) if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"{where} names a class more than once (ignoring case and spaces): {repeated[:5]}; "
                         "give each class once")
    return names


def read_file(path: str | Path, *, where: str) -> list[str]:
    """A vocabulary file: free text or a JSON list, decoded as UTF-8 (a byte-order mark is fine)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} {path}: not UTF-8 text ({e}); save it as UTF-8, one class per line or a "
                         "JSON list") from None
    return parse(text, where=f"{where} {path}")


def read_label_list(path: str | Path) -> list[str]:
    """A dataset's classes.json: a JSON list whose positions are the label values, so an empty or repeated
    name is an error, not dropped."""
    path = Path(path)
    where = str(path)
    text = path.read_text(encoding="utf-8-sig")
    names = [n.strip() for n in json_list(text.strip(), where=where)]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{where}: the names at positions {empty[:5]} are empty; every label value needs a name")
    return check(names, where=where)
