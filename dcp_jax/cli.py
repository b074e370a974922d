"""The command-line style every dcp_jax command shares: absl flags and ml_collections config files.

Every command that takes a config accepts `--config configs/X.py[:ARGS]` and `--config.KEY=VALUE`
overrides (a typo is an error). Commands that read a workdir use the workdir's saved config when
`--config` is not given, with the `--config.KEY=VALUE` overrides applied to it. Flags live in a
`FlagValues` of their own per call, so `main(argv)` can be called repeatedly (tests, scripts).

A user error (a missing file, a bad dataset, a damaged checkpoint, a bad config value) is printed
as one line, `error: ...`, and the command exits with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dcp_jax import config as config_lib
from dcp_jax import files

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
# Bad input for commands that never load a model (the data commands): no JAX import needed to name them.
INPUT_ERRORS = (ValueError, OSError)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: shown as one line."""
    from dcp_jax import checkpoint, runtime
    return (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, checkpoint.CheckpointError, checkpoint.WorkdirLockedError, runtime.BackendError,
            flags.Error)


def split_positional(argv: Sequence[str], flag_values: flags.FlagValues) -> tuple[list[str], list[str]]:
    """(positional arguments, the rest) of a command line. An argument is positional unless it is a flag (`-x`,
    `--x`, `--x=v`) or the value of the non-boolean flag before it (`--raw DIR`); after `--` every one is."""
    positional, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            positional.extend(args)
        elif not arg.startswith("-") or arg == "-":
            positional.append(arg)
        else:
            rest.append(arg)
            name = arg.lstrip("-")
            if "=" not in name and name in flag_values and not flag_values[name].boolean:
                value = next(args, None)  # `--raw DIR`: DIR belongs to the flag
                if value is not None:
                    rest.append(value)
    return positional, rest


def _given_config(argv: Sequence[str]) -> str | None:
    """The value of --config on a command line (None when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(prog: str, value: str | None) -> None:
    """A --config that is not a Python config file: one line naming it (ml_collections would say only
    "an earlier failure to load", or show the file's syntax error)."""
    if value is None:
        return
    path = Path(value.split(":", 1)[0]).expanduser()
    problem = ("no such file" if not path.exists() else "not a file" if not path.is_file()
               else "not a Python config file (configs/X.py with get_config)" if path.suffix != ".py" else None)
    if problem:
        print(f"{prog}: error: --config {value}: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _last_line(error: BaseException) -> str:
    """A flags error whose text holds a whole traceback (a config file's get_config raised): its last line,
    the exception that says what is wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") or "Traceback (most recent call last)" in line
           for line in lines):
        return lines[-1]
    return " ".join(str(error).split())


def _config_error(error: BaseException, given: str | None) -> str:
    """One line for an exception raised while the config file loaded or an override applied (a typo in
    --config.KEY, a config file that raises, lacks get_config, or fails to import)."""
    raw = _last_line(error)
    if "has no attribute 'get_config'" in raw:
        return f"--config {given}: the file has no get_config() function"
    text = raw.replace("\\n", " ").replace("\\'", "")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # ml_collections quotes its KeyError text
        text = text[1:-1]
    text = " ".join(text.split())
    if isinstance(error, TypeError) and text.startswith("--config"):
        return text
    where = f"--config {given}" if given else "the config"
    return f"bad {where} or --config.KEY override ({type(error).__name__}): {text}"


class Command:
    """One invocation's flags: `cmd = Command(prog, doc, argv, config=...)`, define flags on `cmd.flags`,
    then `cmd.parse()`. `positional=("SPEC",)` takes positional arguments before or among the flags
    (`prepare ade150 --raw DIR`), found in `cmd.args` after parsing."""

    def __init__(self, prog: str, doc: str, argv: Sequence[str] | None, *, config: str | None = None,
                 config_help: str = "config file (configs/X.py[:ARGS]); overrides: --config.KEY=VALUE",
                 positional: Sequence[str] = ()):
        self.prog, self.doc = prog, doc
        self.argv = [prog, *(sys.argv[1:] if argv is None else [str(a) for a in argv])]
        self.positional = tuple(positional)
        self.args: list[str] = []
        self.flags = flags.FlagValues()
        self.has_config = config is not None
        if self.has_config:
            _check_config_file(prog, _given_config(self.argv[1:]))
            # ml_collections loads every config file as the module "config_config" with importlib's load_module,
            # which re-executes into a module of that name already loaded: a file without get_config would then
            # run the previous file's get_config (a second command in one process: tests, notebooks).
            sys.modules.pop("config_config", None)
            try:  # the config file is loaded and the --config.KEY overrides checked right here
                config_flags.DEFINE_config_file("config", config, config_help, flag_values=self.flags,
                                                lock_config=True, sys_argv=self.argv)
            except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
                text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
                print(f"{prog}: error: bad --config or --config.KEY override: {text}", file=sys.stderr)
                raise SystemExit(EXIT_USAGE) from None

    def parse(self) -> flags.FlagValues:
        """Parse the command line; --help prints the usage and exits 0, a bad flag exits 2."""
        if any(a in ("-h", "--help", "-help", "--helpfull") for a in self.argv[1:]):
            print(f"usage: {self.prog} [flags]\n\n{self.doc.strip()}\n\nflags:\n{self.flags.get_help()}")
            raise SystemExit(0)
        if self.positional:
            self.args, rest = split_positional(self.argv[1:], self.flags)
            self.argv = [self.argv[0], *rest]
            if len(self.args) != len(self.positional):
                print(f"{self.prog}: error: expected {' '.join(self.positional)}, got {self.args or 'none'}; "
                      "see --help", file=sys.stderr)
                raise SystemExit(EXIT_USAGE)
        try:
            rest = self.flags(self.argv)
            if self.has_config:
                loaded = self.flags.config  # a config file that failed to load raises on first use
                if not isinstance(loaded, ml_collections.ConfigDict):
                    raise TypeError(f"--config {_given_config(self.argv[1:])}: get_config() returned "
                                    f"{type(loaded).__name__}, not an ml_collections.ConfigDict")
                loaded.keys()
        except (flags.Error, ValueError, OSError) as e:  # config files fail to load with these
            print(f"{self.prog}: error: {_last_line(e)}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        except Exception as e:  # noqa: BLE001 - whatever a user's config file or override raised: one line
            print(f"{self.prog}: error: {_config_error(e, _given_config(self.argv[1:]))}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        if len(rest) > 1:
            print(f"{self.prog}: error: unexpected arguments {rest[1:]}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)
        return self.flags

    def required(self, *names: str) -> None:
        for name in names:
            flags.mark_flag_as_required(name, flag_values=self.flags)

    def config(self, workdir: str | os.PathLike | None = None, *, required: bool = True):
        """--config if given; else the workdir's saved config with the --config.KEY overrides (an error
        when it has none, unless not `required`: then the command's default config file)."""
        flag = self.flags["config"]
        if flag.present or workdir is None or (not required and not (Path(workdir) / "config.json").exists()):
            return self.flags.config
        from dcp_jax import checkpoint
        config = checkpoint.load_config(workdir)
        config.update_from_flattened_dict(dict(flag.override_values))
        return config

    def run(self, body: Callable[[], int | None], *, errors: tuple[type[BaseException], ...] | None = None) -> int:
        """Run `body` with quiet library logging; user errors (`errors`, default `user_errors()`) become one
        line and exit status 2."""
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs every file it writes, and notes at WARNING
        # Orbax writes through asyncio tasks: when a write fails, every other task's failure is logged again, with
        # its traceback, as "exception was never retrieved" (135 tracebacks for one full disk); the error that
        # stops the command is reported once, below.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        quiet_disk_full_echoes()
        try:
            return int(body() or 0)
        except (errors or user_errors()) as e:
            if files.disk_full(e) and "disk is full" not in str(e):  # a library's error for it (TensorStore's)
                print(f"{self.prog}: error: {disk_full_message(e)}", file=sys.stderr)
                return EXIT_USAGE
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:  # Ctrl-C (train: the second one; the first stops with a checkpoint)
            print(f"\n{self.prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - a full disk is the user's to fix, whichever library wrote
            if not files.disk_full(e):
                raise
            print(f"{self.prog}: error: {disk_full_message(e)}", file=sys.stderr)
            return EXIT_USAGE


class _DiskFullEchoes(logging.Filter):
    """Drops a log record that repeats a full-disk error: Orbax's writer threads each log the failed write with
    its traceback (~450 lines for one full disk); the command reports it once, on its last line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ((error is not None and files.disk_full(error)) or files.disk_full(Exception(record.getMessage())))


def quiet_disk_full_echoes() -> None:
    """Keep a full disk to the command's one line: the filter above on absl's logger (Orbax logs through it), and
    no "Event loop is closed" reports from TensorStore's callbacks into the event loops that Orbax closed when a
    write failed (~150 tracebacks through sys.unraisablehook)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DiskFullEchoes) for f in logger.filters):
        logger.addFilter(_DiskFullEchoes())
    previous = sys.unraisablehook
    if getattr(previous, "dcp_jax", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.dcp_jax = True
    sys.unraisablehook = hook


def disk_full_message(error: BaseException) -> str:
    detail = " ".join(str(error).split())
    detail = detail if len(detail) <= 240 else detail[:240] + " ..."
    return (f"the disk is full, or a file-size limit was reached, while writing ({detail}); free space or raise the "
            "limit, then run the same command again: files are written atomically, what was written before is intact")


def default_config() -> str:
    """The config a command uses when neither --config nor a workdir gives one: the ViT-B/16 recipe."""
    return config_lib.config_file("dcp_vitb16_coco_stuff")
