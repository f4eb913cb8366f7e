"""Settings for every entry point: one dataclass, an optional TOML file, and --key=value overrides.

Each script (train.py, sample.py, bench.py, attention.py) defines one dataclass; the comment after each field is its
--help text. Values resolve in this order, later wins:

    dataclass defaults  <  TOML file (flat `key = value` lines)  <  --key=value (or --key value) on the command line

    @dataclass
    class TrainConfig:
        learning_rate: float = 6e-4  # peak learning rate, reached after warmup_iters
        max_iters: int = 5000  # number of optimizer steps
        compile: bool = True  # wrap the model in torch.compile

    cfg = parse_config(TrainConfig, description=__doc__)
    print(format_config(cfg))  # only the settings that differ from the defaults

    python train.py configs/shakespeare_char.toml --max_iters=2_000 --compile=false

Fields may be int, float, str, bool or `X | None` of those (`none` or `null` sets None). Booleans take
true/false/1/0/yes/no; floats must be finite. Every number has a range (value_range): its field's metadata "range"
(bounded makes such a field), else SHARED_RANGES's for a setting several scripts share, else NUMBER_RANGE;
--help shows each one but NUMBER_RANGE. A mistake (unknown key, wrong type, nan or inf, a number out of its range,
missing file) exits with one line that names the key and the fix; a ValueError from the dataclass's __post_init__
does the same.
"""

import dataclasses
import difflib
import functools
import inspect
import io
import itertools
import math
import os
import re
import sys
import textwrap
import time
import tokenize
import tomllib
import types
import typing
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# Every number a user sets is bounded, so that a mistyped one ends in one line at once, not in a hang, a crash or a
# silent run of years.
NUMBER_RANGE = (0, 2**31 - 1)  # counts, sizes, rates, seconds: none needs more, and torch indexes most with int32
MAX_THREADS = max(1024, 4 * (os.cpu_count() or 1))  # a million threads crash torch after starving the machine
SHARED_RANGES = {"seed": (0, 2**63 - 1),  # 64 bits, as torch, numpy and serve.py's requests take
                 "threads": (0, MAX_THREADS), "peak_flops": (0, 1e18)}  # FLOP/s: an H100's is 989e12


def _unwrap(field_type: Any) -> tuple[type, bool]:
    """(base type, whether None is allowed) for int, float, str, bool and their `X | None`."""
    optional = False
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(field_type) if a is not type(None)]
        optional = len(args) < len(typing.get_args(field_type))
        field_type = args[0] if optional and len(args) == 1 else field_type
    if field_type not in _TYPES:
        raise TypeError(f"unsupported config type {field_type!r}; use int, float, str, bool or X | None of those")
    return field_type, optional


def _settings(cls: type) -> dict[str, tuple[Any, Any]]:
    """Field name -> (type, default or MISSING); get_type_hints resolves `from __future__ import annotations`."""
    hints, settings = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.init:
            _unwrap(hints[f.name])  # an unsupported type fails here, whatever the command line says
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            settings[f.name] = (hints[f.name], default)
    return settings


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its trailing `# comment` in the class source; {} where the source is unavailable."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (OSError, TypeError, SyntaxError, tokenize.TokenError):
            continue
        lines: dict[int, list[tokenize.TokenInfo]] = {}
        for tok in tokens:
            if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                lines.setdefault(tok.start[0], []).append(tok)
        # `name: type ... # comment` lines; the fields are the least indented ones (not locals in methods)
        found = [t for t in lines.values() if len(t) > 2 and t[0].type == tokenize.NAME and t[1].string == ":"
                 and t[-1].type == tokenize.COMMENT]
        body_col = min((t[0].start[1] for t in found), default=0)
        own: dict[str, str] = {}
        for t in found:
            if t[0].start[1] == body_col:
                own.setdefault(t[0].string, t[-1].string.lstrip("#").strip())
        helps.update(own)
    return helps


def parse_value(field_type: Any, text: str, key: str) -> Any:
    """Convert command-line text to `field_type`; SystemExit naming --key if it does not fit."""
    base, optional = _unwrap(field_type)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return _BOOLS[text.strip().lower()]
        value = base(text)  # int() takes `5_000` but not `1e3`; float() takes `6e-4`
    except (KeyError, ValueError):
        raise SystemExit(f"--{key} expects {_TYPES[base]}, got {text!r}") from None
    if base is float and not math.isfinite(value):  # float() also takes nan, inf and 1e999
        raise SystemExit(f"--{key} expects a finite number, got {text!r}")
    return value


def bounded(default: Any, lo: float, hi: float) -> Any:
    """A dataclass field whose number must lie in [lo, hi] (None aside): value_range reads it, and GPTConfig checks
    its own fields' for configs built from files."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi)})


def value_range(f: dataclasses.Field) -> tuple[float, float]:
    """The inclusive (lo, hi) of a number setting: the field's own, else a shared setting's, else NUMBER_RANGE."""
    return f.metadata.get("range") or SHARED_RANGES.get(f.name) or NUMBER_RANGE


def show_range(lo: float, hi: float) -> str:
    """`lo to hi`, with powers of two (and one less) above a million written as such: 2**31 - 1, not 2147483647."""
    def show(x: float) -> str:
        if isinstance(x, float):
            return f"{x:g}".replace("e+0", "e").replace("e+", "e")  # 1e9, not 1e+09
        for k in range(20, 64):
            if abs(x) in (2**k, 2**k - 1):
                return f"{'-' * (x < 0)}2**{k}{' - 1' * (abs(x) == 2**k - 1)}"
        return str(x)
    return f"{show(lo)} to {show(hi)}"


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    lo, hi = value_range(f)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not lo <= value <= hi:
        raise SystemExit(f"{where} is out of range: use a number from {show_range(lo, hi)}")


def _check_toml_value(field_type: Any, value: Any, where: str) -> Any:
    """Check a value as tomllib parsed it: ints are fine for floats, nothing is converted from a string."""
    base, optional = _unwrap(field_type)
    if optional and isinstance(value, str) and value.lower() in ("none", "null"):
        return None  # TOML has no null
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not base:
        raise SystemExit(f"{where} expects {_TYPES[base]}, got {value!r}")
    if base is float and not math.isfinite(value):  # TOML has nan and inf
        raise SystemExit(f"{where} expects a finite number, got {value!r}")
    return value


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat TOML config file; SystemExit with a one-line reason if it is missing, invalid or has tables."""
    if Path(path).suffix == ".py":  # nanoGPT's habit: python train.py config/train_shakespeare_char.py
        names = sorted(p.stem for p in (Path(__file__).resolve().parent / "configs").glob("*.toml"))
        close = difflib.get_close_matches(Path(path).stem.removeprefix("train_"), names, n=1, cutoff=0.6)
        raise SystemExit(f"{path}: config files are TOML here, not Python (configs/*.toml); e.g. "
                         f"configs/{(close or ['shakespeare_char_cpu'])[0]}.toml")  # the quick start's
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SystemExit(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SystemExit(f"config file {path} is a folder: pass a .toml file, e.g. configs/shakespeare_char_cpu.toml"
                         ) from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes itself
        raise SystemExit(f"{path}: not UTF-8 text (bad byte at offset {e.start}): a config file is TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"{path}: invalid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise SystemExit(f"{path}: [{key}] is a table; config files are flat, move its keys to the top level")
    return data


def _check_key(key: str, names: dict[str, Any], where: str) -> None:
    if key not in names:
        close = difflib.get_close_matches(key, list(names), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SystemExit(f"unknown setting '{key}'{where}{hint}; run with --help to list them")


def _split_argv(argv: list[str]) -> tuple[str | None, dict[str, str], bool]:
    """([config file], {key: text}, whether -h/--help was asked for) from `[FILE.toml] --key=value --key value ...`.

    -h is help only where it is not a value: `--dataset -h` sets dataset to "-h".
    """
    path, overrides, wants_help, i = None, {}, False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
        elif not arg.startswith("-"):
            if path is not None:
                raise SystemExit(f"only one config file may be given, got '{path}' and '{arg}'")
            path = arg
        elif not arg.startswith("--") or len(arg) == 2 or arg[2] == "=":
            raise SystemExit(f"malformed argument '{arg}': write settings as --key=value")
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                    raise SystemExit(f"--{key} needs a value: write --{key}=VALUE")
                i, text = i + 1, argv[i + 1]
            overrides[key] = text
        i += 1
    return path, overrides, wants_help


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and not value.isprintable():
        return repr(value)  # a default such as "\n" shows as '\n', not as a line break in the help screen
    return str(value)


HELP_WIDTH = 100  # columns of every --help screen (an 80-column terminal wraps a few lines; 120 wraps most)


def help_text(cls: type, description: str = "") -> str:
    """The --help screen: the description, a usage line, and `--name=<default>  type  help` per field, each help
    wrapped beside its column; all within HELP_WIDTH."""
    helps, rows, own = field_help(cls), [], {f.name: f for f in dataclasses.fields(cls)}
    for name, (tp, default) in _settings(cls).items():
        shown = "<required>" if default is dataclasses.MISSING else _show(default)
        base, optional = _unwrap(tp)
        bounds = value_range(own[name]) if base in (int, float) else NUMBER_RANGE
        note = f" ({show_range(*bounds)})" if bounds != NUMBER_RANGE else ""
        rows.append((f"--{name}={shown}", base.__name__ + (" | None" if optional else ""), helps.get(name, "") + note))
    # A long default (a path, a prompt) gets a line of its own rather than pushing every help to the right.
    w0 = max((len(a) for a, _, _ in rows if len(a) <= HELP_WIDTH // 3), default=0)
    w1 = max((len(b) for _, b, _ in rows), default=0)
    indent = " " * (2 + w0 + 2 + w1 + 2)
    prog = os.path.basename(sys.argv[0]) or "script.py"
    lines = [fit_text(description.strip()), ""] if description.strip() else []
    lines += [f"usage: python {prog} [CONFIG.toml] [--key=value ...]",
              f"(a number is from {show_range(*NUMBER_RANGE)} where no other range is shown)", ""]
    for a, b, c in rows:
        if len(a) > w0:
            lines.append(f"  {a}")
            a = ""
        first = f"  {a:<{w0}}  {b:<{w1}}  "
        wrapped = textwrap.wrap(c, HELP_WIDTH - len(indent), break_long_words=False, break_on_hyphens=False)
        lines.append((first + (wrapped[0] if wrapped else "")).rstrip())
        lines += [indent + more for more in wrapped[1:]]
    return "\n".join(lines)


def fit_text(text: str, width: int = HELP_WIDTH) -> str:
    """A docstring laid out within `width` columns. A paragraph of prose with an over-long line is refilled. In an
    indented block (commands) with an over-long line, each `# comment` goes on a line of its own above its command
    (a comment-only line indented further continues the one before) and a command still too long is broken with
    shell continuations. Whatever fits is left as written."""
    out: list[str] = []
    for indented, group in itertools.groupby(text.splitlines(), key=lambda line: line[:1].isspace()):
        lines = list(group)
        if all(len(line) <= width for line in lines):
            out += lines
        elif indented:
            out += _fit_commands(lines, width)
        else:  # prose; blank lines (which are not indented) keep the paragraphs apart
            for blank, paragraph in itertools.groupby(lines, key=lambda line: not line.strip()):
                paragraph = list(paragraph)
                out += paragraph if blank else textwrap.wrap(" ".join(paragraph), width, break_long_words=False,
                                                             break_on_hyphens=False)
    return "\n".join(out)


def _fit_commands(lines: list[str], width: int) -> list[str]:
    entries: list[tuple[str, str, list[str]]] = []  # (indent, command, its comments)
    for line in lines:
        indent, body = line[:len(line) - len(line.lstrip())], line.strip()
        if body.startswith("#"):
            if entries and len(indent) > len(entries[-1][0]):  # aligned under the comment before: its continuation
                entries[-1][2].append(body.lstrip("# "))
            else:
                entries.append((indent, "", [body.lstrip("# ")]))
        elif match := re.fullmatch(r"(.*?\S)\s{2,}#\s*(.*)", body):
            entries.append((indent, match[1], [match[2]]))
        else:
            entries.append((indent, body, []))
    out = []
    for indent, command, comments in entries:
        if comments:
            out += textwrap.wrap(" ".join(comments), width, initial_indent=indent + "# ",
                                 subsequent_indent=indent + "# ", break_long_words=False, break_on_hyphens=False)
        if not command:
            continue
        words = re.findall(r"""(?:[^\s"']+|"[^"]*"|'[^']*')+""", command)
        if re.sub(r"\s", "", "".join(words)) != re.sub(r"\s", "", command):  # an unmatched quote: left whole
            words = [command]
        parts = [indent]  # broken between shell words only, never inside quotes: the command stays the same
        for word in words:
            if len(parts[-1]) + len(word) + 1 > width - 2 and parts[-1].strip():
                parts.append(indent + "    ")
            parts[-1] += word if not parts[-1].strip() else " " + word
        out += [part + " \\" for part in parts[:-1]] + parts[-1:]
    return out


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Build `cls` from its defaults, then the TOML file, then --key=value overrides (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = _settings(cls)
    path, overrides, wants_help = _split_argv(argv)
    if wants_help:
        print(help_text(cls, description))
        raise SystemExit(0)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # key -> how the error names the value that was kept
    if path is not None:
        for key, value in load_toml(path).items():
            _check_key(key, settings, f" in {path}")
            values[key] = _check_toml_value(settings[key][0], value, f"{path}: {key}")
            where[key] = f"{path}: {key} = {value}"
    for key, text in overrides.items():
        _check_key(key, settings, "")
        values[key] = parse_value(settings[key][0], text, key)
        where[key] = f"--{key}={text}"
    for f in dataclasses.fields(cls):  # the final values, before __post_init__ loops or allocates by one of them
        if f.name in values:
            _check_range(f, values[f.name], where[f.name])
    for name, (_, default) in settings.items():
        if name not in values and default is dataclasses.MISSING:
            raise SystemExit(f"missing required setting '{name}': pass --{name}=VALUE or set it in the config file")
    try:
        return cls(**values)  # __post_init__ validation sees the final values
    except ValueError as e:
        raise SystemExit(str(e)) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of the settings, for checkpoints and logs (a field with init=False is not a setting)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def format_config(cfg: Any) -> str:
    """The settings that differ from the dataclass defaults, as aligned `key = value` lines after a heading: what a
    run's start prints (--help shows every default, a checkpoint keeps every value)."""
    defaults = {name: default for name, (_, default) in _settings(type(cfg)).items()}
    changed = {k: v for k, v in config_to_dict(cfg).items() if k not in defaults or v != defaults[k]}
    if not changed:
        return "settings: the defaults (--help lists them)"
    width = max(len(k) for k in changed)
    return "\n".join(["settings that differ from the defaults (--help lists them all):"] +
                     [f"  {k:<{width}} = {v!r}" if isinstance(v, str) else f"  {k:<{width}} = {_show(v)}"
                      for k, v in changed.items()])


# ---------------------------------------------------------------------------------- device and dtype settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device a `device` setting names (auto: cuda, else mps, else cpu); SystemExit if it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device={name} is not a device: use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={name} but this torch sees no CUDA GPU: use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device={name} but MPS is not available here: use --device=cpu")
    return device


def busy_cores(interval: float = 0.1) -> float:
    """How many of the machine's cores other processes keep busy now: /proc/stat sampled over `interval` seconds
    (Linux), else the 1-minute load average (which still counts processes that ended a minute ago)."""
    def ticks() -> tuple[int, int]:  # (all, idle + iowait) jiffies since boot, summed over the cores
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]

    try:
        total, idle = ticks()
        time.sleep(interval)
        total2, idle2 = ticks()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (idle2 - idle) / max(1, total2 - total))


def set_threads(threads: int | None) -> int:
    """Apply a `threads` setting to torch's CPU thread pool and return the number in use.

    None: $OMP_NUM_THREADS when set, else the cores that are idle now (at least 1): torch's one thread per core is fastest on an idle machine, but oversubscribes one that other processes
    share, which can be 10x slower (docs/benchmarks.md, "Threads"). 0: one per core, whatever the load.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, cores - round(busy_cores()))
    if not 0 <= threads <= MAX_THREADS:  # $OMP_NUM_THREADS or a checkpoint's count, which no parser has checked
        raise SystemExit(f"threads={threads} is out of range: use 0 (one per core) to {MAX_THREADS} (--threads, "
                         f"$OMP_NUM_THREADS)")
    torch.set_num_threads(threads or cores)
    return torch.get_num_threads()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a `dtype` setting names (auto: bfloat16 where CUDA supports it, else float32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype={name}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast_context(device: torch.device | str, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for a forward pass: autocast to dtype on the device's type ("cuda", not "cuda:1"); nothing
    for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(torch.device(device).type, dtype=dtype)


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions on Ampere and newer (no effect elsewhere)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_compiler(device: torch.device, compile: bool = True) -> None:
    """SystemExit in one line where torch.compile (if asked for) could not build its kernels: on a CPU, inductor
    writes C++ and needs a compiler (found as $CXX or g++ / clang++), which it would report as a 100-line traceback."""
    if not compile or device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler  # here: inductor takes ~1 s to import

    try:
        get_cpp_compiler()
    except RuntimeError as e:
        raise SystemExit(f"--compile on the CPU builds C++ kernels, and no working C++ compiler was found ({e}): "
                         f"install g++ and Python's headers (apt install g++ python3-dev), point $CXX at one, or "
                         f"drop --compile") from None


@functools.cache  # asked once per GPU and head size in eager mode
def flash_supported(device_index: int, head_dim: int) -> bool:
    """Whether SDPA's flash kernel runs on this GPU for this head size (PyTorch's sdp_utils: sm80 or newer, head_dim
    a multiple of 8, at most 256, or 192 on sm86/sm89 whose backward lacks the shared memory). Warns once if not."""
    major, minor = torch.cuda.get_device_capability(device_index)
    limit = 192 if (major, minor) in ((8, 6), (8, 9)) else 256
    if major >= 8 and head_dim % 8 == 0 and head_dim <= limit:
        return True
    warnings.warn(f"the flash attention kernel does not run on {torch.cuda.get_device_name(device_index)} "
                  f"(compute capability {major}.{minor}) with head_dim {head_dim}: attention uses another, slower "
                  f"SDPA kernel. Flash needs compute capability 8.0 or newer and n_embd / n_head a multiple of 8, "
                  f"at most {limit} here")
    return False


# torch.compiler.assume_constant_result's mark (a constant to torch.compile's trace), set without importing
# torch._dynamo at start-up; tests/test_model.py checks that the mark is still what torch sets.
flash_supported._dynamo_marked_constant = True


# ------------------------------------------------------------------------------------------------- text settings


def read_prompt(text: str, option: str = "--start") -> str:
    """The text a prompt setting names (sample.py's --start, attention.py's --text): the text itself, FILE:path, or
    - for standard input."""
    if text == "-":
        try:
            return sys.stdin.read()  # sys.stdin is None when the shell closed it (<&-)
        except (AttributeError, OSError, UnicodeDecodeError) as e:
            why = "it is closed" if sys.stdin is None else f"it cannot be read as UTF-8 text ({e})"
            raise SystemExit(f"{option}=- reads standard input, but {why}: pipe the text in (echo TEXT | python "
                             f"{Path(sys.argv[0]).name} {option}=-), or pass {option}=TEXT or {option}=FILE:path"
                             ) from None
    if text.startswith("FILE:"):
        path = Path(text.removeprefix("FILE:"))
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SystemExit(f"{option}=FILE:{path} cannot be read as UTF-8 text: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"{option}=FILE:{path} cannot be read as UTF-8 text ({e})") from None
    return text


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak FLOP/s of known GPUs (NVIDIA's data sheets, SXM parts); None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                       ("L40S", 362e12), ("4090", 165e12), ("A10G", 70e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None
