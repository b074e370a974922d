"""The README and docs/ stay short, linked and runnable.

- README.md is under 12 kB, and its first two ```bash blocks are the two commands (`.ci/run` runs the second).
- Every relative link in README.md and docs/*.md names a file in the tree, and a `#anchor` names a heading of
  that file (GitHub's slug rule).
- Every `python -m dcp_jax.<module>` line in their ```bash blocks names a module that exists and passes only
  flags that module defines; `--config.KEY=...` overrides name a key of the configs in configs/.

The flags are read from each command's own help (`main(["--help"])`, absl or argparse), all modules in one
subprocess, without running any command's work.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 12 * 1024

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
BASH_BLOCK = re.compile(r"```bash\n(.*?)\n```", re.S)  # the pattern .ci/run uses
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
COMMAND = re.compile(r"\bpython3?\b")
ALWAYS_DEFINED = {"help", "helpfull"}  # cli.Command and argparse both answer these


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Links and anchors
# --------------------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's heading anchor: link syntax reduced to its text, lowercased, every character but letters,
    digits, spaces, hyphens and underscores dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a file's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", markdown)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(path: Path, markdown: str) -> list[str]:
    """Relative links of `markdown` (the text of `path`) that name no file of the tree, or no heading."""
    problems = []
    for match in LINK.finditer(FENCE.sub("", markdown)):
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve()
        where = f"{rel(path)}: ({target})"
        if not file_part:  # an anchor in the same file
            if anchor and anchor not in anchors(markdown):
                problems.append(f"{where}: no heading of {rel(path)} has the anchor #{anchor}")
        elif ROOT != dest and ROOT not in dest.parents:
            problems.append(f"{where} points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file {rel(dest)}")
        elif anchor:
            if dest.suffix.lower() != ".md" or not dest.is_file():
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest.read_text()):
                problems.append(f"{where}: no heading of {rel(dest)} has the anchor #{anchor}")
    return problems


# --------------------------------------------------------------------------------------------------
# Commands and their flags
# --------------------------------------------------------------------------------------------------

def command_lines(markdown: str) -> list[str]:
    """The shell lines of the ```bash blocks, continuation lines joined."""
    lines = []
    for block in BASH_BLOCK.findall(markdown):
        lines += [line.strip() for line in block.replace("\\\n", " ").split("\n") if line.strip()]
    return lines


def dcp_commands(line: str) -> list[tuple[str, list[str]]]:
    """(module, arguments) for each `python -m dcp_jax.X ...` on a shell line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        tokens = line.split("#", 1)[0].split()
    out = []
    for i in range(len(tokens) - 2):
        python = tokens[i].rsplit("/", 1)[-1]
        if COMMAND.fullmatch(python) and tokens[i + 1] == "-m" and tokens[i + 2].split(".")[0] == "dcp_jax":
            args = []
            for token in tokens[i + 3:]:
                if token in ("&&", "||", "|", ";", "&"):
                    break
                ends = token.endswith(";")
                args.append(token.rstrip(";"))
                if ends:
                    break
            out.append((tokens[i + 2], args))
    return out


_PROBE = r'''
import contextlib, importlib, io, json, sys
from pathlib import Path

result = {"modules": {}, "config_keys": None}
for name in sys.argv[1:]:
    entry = {"exists": False, "help": "", "error": None}
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            result["modules"][name] = entry  # the module itself is missing
            continue
        entry["error"] = f"import failed: {e!r}"
        result["modules"][name] = entry
        continue
    except Exception as e:
        entry["error"] = f"import failed: {e!r}"
        result["modules"][name] = entry
        continue
    entry["exists"] = True
    main = getattr(module, "main", None)
    if main is None:
        entry["error"] = "has no main()"
    else:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                main(["--help"])
        except SystemExit:
            pass
        except Exception as e:
            entry["error"] = f"main(['--help']) raised {e!r}"
        entry["help"] = out.getvalue()
    result["modules"][name] = entry

try:  # every key of every recipe in configs/ (each get_config() with no argument)
    import importlib.util
    from ml_collections import ConfigDict
    keys = set()
    def walk(prefix, value):
        if isinstance(value, (ConfigDict, dict)):
            for k, v in value.items():
                keys.add(prefix + k)
                walk(prefix + k + ".", v)
    for path in sorted(Path("configs").glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"_docs_config_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        walk("", mod.get_config())
    result["config_keys"] = sorted(keys)
except Exception as e:  # not simple after all: the keys are not checked
    result["config_error"] = repr(e)

print("@@PROBE@@" + json.dumps(result))
'''


def flags_from_help(text: str) -> set[str]:
    """Flag names a help text defines: absl's `flags:` listing (cli.Command: `  --name:`, `  --[no]name:`)
    and argparse's `options:` section (`  -h, --help`, `  --out OUT`)."""
    names: set[str] = set()
    mode = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            head = line.strip()
            if head == "flags:":
                mode = "absl"  # absl's per-module headers below keep it
            elif head in ("options:", "optional arguments:"):
                mode = "argparse"
            elif mode == "argparse":
                mode = None  # the epilog
            continue
        if mode == "absl":
            match = re.match(r"^  --(\[no\])?([\w.-]+):", line)
            if match:
                names.add(match.group(2))
                if match.group(1):
                    names.add("no" + match.group(2))
        elif mode == "argparse" and re.match(r"^  -", line):
            spec = re.split(r"\s{2,}", line.strip())[0]
            names.update(re.findall(r"(?:^|, )--([\w-]+)", spec))
    return names


def probe(modules) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *sorted(set(modules))], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@PROBE@@")]
    assert marker, f"the flag probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(marker[-1][len("@@PROBE@@"):])


def command_problems(where: str, markdown: str, probed: dict) -> list[str]:
    """Commands in `markdown`'s bash blocks that name a missing module or pass a flag it does not define."""
    problems = []
    keys = probed.get("config_keys")
    for line in command_lines(markdown):
        for module, args in dcp_commands(line):
            entry = probed["modules"].get(module)
            label = f"{where}: python -m {module}"
            if entry is None or not entry["exists"]:
                problems.append(f"{label}: no such module")
                continue
            if entry["error"]:
                problems.append(f"{label}: {entry['error']}")
                continue
            defined = flags_from_help(entry["help"])
            if not defined:
                problems.append(f"{label}: no flags could be read from its --help")
                continue
            defined |= ALWAYS_DEFINED
            for arg in args:
                arg = arg.strip("[]")
                if not arg.startswith("--") or arg == "--":
                    continue
                name = arg[2:].split("=", 1)[0]
                if name.startswith("config."):
                    key = name[len("config."):]
                    if "config" not in defined:
                        problems.append(f"{label}: {arg}: the command has no --config")
                    elif keys is not None and key not in keys:
                        problems.append(f"{label}: {arg}: no config key {key!r} in configs/")
                elif name not in defined:
                    problems.append(f"{label}: flag --{name} is not defined by the command")
    return problems


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

FAKE_DOC = """# A page

See [the demo](#a-page), [a missing file](no_such_file.md), [a bad anchor](#no-such-heading).

```bash
python -m dcp_jax.train --workdir runs/x --no-such-flag 3 --config.no_such.key=1 --config.seed=1
python -m dcp_jax.no_such_module --out x
```
"""


@pytest.fixture(scope="module")
def probed() -> dict:
    modules = {"dcp_jax.train", "dcp_jax.no_such_module"}
    for path in doc_files():
        for line in command_lines(path.read_text()):
            modules.update(module for module, _ in dcp_commands(line))
    return probe(modules)


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; the limit is {README_LIMIT} (move text to docs/)"


def test_readme_starts_with_the_two_commands():
    blocks = BASH_BLOCK.findall(README.read_text())
    assert len(blocks) >= 2
    run, test = blocks[0].strip(), blocks[1].strip()
    for block in (run, test):
        assert block.startswith("python3 -m venv .venv && "), block
        assert "\n" not in block, "each of the two commands is one line"
    assert "pip install -e . " in run and "-m dcp_jax.train" in run
    assert 'pip install -e ".[test]"' in test and "-m pytest" in test  # .ci/run runs this one


def test_links_resolve():
    problems = [p for path in doc_files() for p in link_problems(path, path.read_text())]
    assert not problems, "\n".join(problems)


def test_commands_name_defined_flags(probed):
    problems = [p for path in doc_files() for p in command_problems(rel(path), path.read_text(), probed)]
    assert not problems, "\n".join(problems)


def test_checks_catch_mistakes(probed):
    """The checks above can fail: a hand-made page with a broken link, a bad anchor, an undefined flag, an
    unknown config key and a missing module."""
    links = link_problems(ROOT / "docs" / "fake.md", FAKE_DOC)
    assert len(links) == 2 and "no_such_file.md" in links[0] and "#no-such-heading" in links[1], links
    problems = command_problems("fake.md", FAKE_DOC, probed)
    assert any("--no-such-flag" in p for p in problems), problems
    assert any("dcp_jax.no_such_module: no such module" in p for p in problems), problems
    if probed.get("config_keys") is not None:
        assert any("no_such.key" in p for p in problems), problems
    assert not any("config.seed" in p for p in problems), problems
    assert len(problems) == 2 + (probed.get("config_keys") is not None), problems


def test_flag_parsing_reads_absl_and_argparse():
    absl_help = ("usage: python -m dcp_jax.x [flags]\n\nDoc naming --not-a-flag.\n\nflags:\n\ndcp_jax.x:\n"
                 "  --out: where\n    --continuation: not a flag\n  --[no]verify: check\n\nabsl.flags:\n"
                 "  --flagfile: Insert\n")
    assert flags_from_help(absl_help) == {"out", "verify", "noverify", "flagfile"}
    argparse_help = ("usage: python -m dcp_jax.y [-h] [--out OUT]\n\noptions:\n  -h, --help            show\n"
                     "  --out OUT             directory\n                        --nope: continuation\n"
                     "  --num-images NUM_IMAGES\n\nepilog:\n  --epilog-flag  not defined\n")
    assert flags_from_help(argparse_help) == {"help", "out", "num-images"}
    assert slug("Memory per device: which settings") == "memory-per-device-which-settings"
    assert slug("0. CLIP backbone (models/clip.py)") == "0-clip-backbone-modelsclippy"
    assert slug("Prediction: your images, your classes") == "prediction-your-images-your-classes"
