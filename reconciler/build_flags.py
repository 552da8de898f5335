"""The allow-list for build inputs that reach a build tool's command line.

    Workload manifest ──manifests/compile.py──▶ build_input_problems()   (refused at validate)
                      ──builders/executable.py──▶ compiler_flags()        (refused again at build)

Every commit of the fleet repository is untrusted, and a compiler flag is a command: gcc's
``-wrapper /bin/sh,-c,...`` runs a program around every compiler pass, ``-fplugin=`` loads a
shared object into the compiler, ``@file`` reads more flags from a file, ``-B``/``-specs``
replace the programs gcc runs. Builds also run sandboxed (``builders/sandbox.py``), but the
flags are checked first so that a hostile manifest is refused with a line saying why, at
``validate`` time, before anything runs.

The check is an allow-list: a flag passes only if a row of ``COMPILER_FLAGS`` or
``LINKER_FLAGS`` matches it whole. ``REFUSED`` only gives a better reason for the flags people
reach for; anything else unknown is refused too. Paths may only name something inside the
workload's source tree (relative, no ``..``). Pure: no I/O, importable by the manifests layer and
by the builders alike.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence

from reconciler.errors import BuildError

# A path inside the source tree: relative, plain characters, never starting with '-'.
_TREE_PATH = r"(?![-/])[A-Za-z0-9_.+/-]{1,255}"
_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
# Macro values: C tokens without spaces, slashes or shell-ish characters.
_VALUE = r'[A-Za-z0-9_.+:"-]{0,255}'
_F_FEATURES = (
    "pic|PIC|pie|PIE|common|strict-aliasing|wrapv|trapv|omit-frame-pointer|function-sections|"
    "data-sections|builtin|math-errno|fast-math|unroll-loops|inline-functions|signed-char|"
    "unsigned-char|short-enums|stack-protector|stack-protector-strong|stack-protector-all|"
    "stack-clash-protection|strict-overflow|exceptions|asynchronous-unwind-tables|"
    "unwind-tables|plt|semantic-interposition|delete-null-pointer-checks|tree-vectorize|"
    "diagnostics-show-caret|freestanding|hosted|ident"
)

# (pattern matching one whole flag, what it is) - the compiler flags a manifest may set.
COMPILER_FLAGS: tuple[tuple[str, str], ...] = (
    (r"-O[0-3sgz]?|-Ofast", "optimisation level"),
    (r"-g[0-3]?|-ggdb[0-3]?|-gdwarf(-[2-5])?", "debug information"),
    (r"-w|-Wall|-Wextra|-Wpedantic|-pedantic|-pedantic-errors|-Werror", "warnings"),
    (r"-W(no-)?(error=)?[a-z0-9][a-z0-9+-]{0,63}(=[0-9]{1,3})?", "one warning"),
    (rf"-D{_NAME}(={_VALUE})?|-U{_NAME}", "a macro"),
    (
        r"-std=(c|gnu)(89|90|99|9x|11|1x|17|18|2x|23)|-std=iso9899:(1990|199409|1999|2011|2017)",
        "C standard",
    ),
    (rf"-f(no-)?({_F_FEATURES})", "a code generation feature"),
    (r"-fvisibility=(default|hidden|internal|protected)", "symbol visibility"),
    (r"-fcf-protection(=(full|branch|return|none|check))?", "control-flow protection"),
    (r"-fdiagnostics-color(=(auto|always|never))?|-fmax-errors=[0-9]{1,4}", "diagnostics"),
    (r"-march=[a-z0-9][a-z0-9.-]{0,31}|-mtune=[a-z0-9][a-z0-9.-]{0,31}", "target CPU"),
    (rf"-I{_TREE_PATH}|-iquote{_TREE_PATH}", "an include directory inside the source tree"),
    (r"-pthread|-pipe|-static|-s|-m64", "build mode"),
)

# The flags that may follow the sources on the link line.
LINKER_FLAGS: tuple[tuple[str, str], ...] = (
    (r"-l[A-Za-z0-9_][A-Za-z0-9_+.-]{0,63}", "a library from the toolchain"),
    (rf"-L{_TREE_PATH}", "a library directory inside the source tree"),
    (r"-pthread|-static|-s", "link mode"),
)

# Flags that take their value as the next word, joined before checking (``-I dir``).
_SEPARATE_VALUE = {"-I", "-iquote", "-D", "-U", "-L", "-l"}

# (prefix, why it is refused) - better messages for the flags people reach for.
REFUSED: tuple[tuple[str, str], ...] = (
    ("-wrapper", "it runs a program of the manifest's choosing around every compiler pass"),
    ("-fplugin", "it loads a shared object into the compiler"),
    ("-specs", "it replaces the programs and options gcc uses"),
    ("--specs", "it replaces the programs and options gcc uses"),
    ("-B", "it makes gcc run its passes from another directory"),
    ("@", "it reads more flags from a file"),
    ("-o", "the builder chooses where the output goes"),
    ("-Wl,", "it passes raw options to the linker"),
    ("-Xlinker", "it passes raw options to the linker"),
    ("-Wa,", "it passes raw options to the assembler"),
    ("-Xassembler", "it passes raw options to the assembler"),
    ("-Wp,", "it passes raw options to the preprocessor"),
    ("-Xpreprocessor", "it passes raw options to the preprocessor"),
    ("-include", "it includes a file by path; #include it from the source instead"),
    ("-imacros", "it includes a file by path"),
    ("-isystem", "it adds an include directory by absolute path"),
    ("-idirafter", "it adds an include directory by absolute path"),
    ("--sysroot", "it changes where the toolchain looks for headers and libraries"),
    ("-isysroot", "it changes where the toolchain looks for headers and libraries"),
    ("-fprofile", "it writes or reads profile files by path"),
    ("-fdump", "it writes files by path"),
    ("-save-temps", "it writes files by path"),
    ("-M", "it writes dependency files by path"),
    ("-x", "it changes how gcc reads its inputs"),
    ("-print", "it queries the toolchain instead of building"),
    ("-fsanitize", "it needs runtime libraries a static build does not have"),
)

# build.options keys: (languages it applies to, flag table, where it goes on the command line).
OPTIONS: Mapping[str, tuple[frozenset[str], tuple[tuple[str, str], ...]]] = {
    "cflags": (frozenset({"c"}), COMPILER_FLAGS),
    "ldflags": (frozenset({"c"}), LINKER_FLAGS),
}

_COMPILED = {
    key: re.compile("|".join(f"(?:{pattern})" for pattern, _ in table))
    for key, (_, table) in OPTIONS.items()
}


def _words(value: str) -> list[str]:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise BuildError(f"cannot split {value!r} into flags: {exc}") from exc
    joined: list[str] = []
    pending = ""
    for word in words:
        if pending:
            joined.append(pending + word)
            pending = ""
        elif word in _SEPARATE_VALUE:
            pending = word
        else:
            joined.append(word)
    if pending:
        raise BuildError(f"{pending} needs a value")
    return joined


def _why_refused(flag: str) -> str:
    for prefix, why in REFUSED:
        if flag.startswith(prefix):
            return why
    if "/" in flag:
        return "it names a path; only relative paths inside the source tree are allowed"
    return "it is not in the allow-list (see the README's build-matrix section)"


def _tree_path_escapes(flag: str) -> bool:
    for prefix in ("-iquote", "-I", "-L"):
        if flag.startswith(prefix):
            path = posixpath.normpath(flag[len(prefix) :])
            return path == ".." or path.startswith("../") or path.startswith("/")
    return False


def checked_flags(option: str, value: str) -> list[str]:
    """The words of ``build.options.<option>``, each checked; ``BuildError`` names the first
    flag refused and why."""
    if option not in OPTIONS:
        raise BuildError(f"unknown build option {option!r} (known: {', '.join(sorted(OPTIONS))})")
    pattern = _COMPILED[option]
    flags = _words(value)
    for flag in flags:
        if _tree_path_escapes(flag):
            raise BuildError(f"{option}: {flag!r} is refused: it points outside the source tree")
        if "\x00" in flag or not pattern.fullmatch(flag):
            raise BuildError(f"{option}: {flag!r} is refused: {_why_refused(flag)}")
    return flags


def entrypoint_problem(entrypoint: str) -> str | None:
    """Why ``entrypoint`` cannot be handed to a build tool, or None. The manifests layer also
    checks that it names a file inside the source tree; this is what a command line needs."""
    if entrypoint.startswith("-"):
        return f"entrypoint {entrypoint!r} starts with '-' (a build tool would read it as a flag)"
    if "\x00" in entrypoint or "\n" in entrypoint:
        return f"entrypoint {entrypoint!r} contains a control character"
    normal = posixpath.normpath(entrypoint)
    if entrypoint.startswith("/") or normal == ".." or normal.startswith("../"):
        return f"entrypoint {entrypoint!r} must be a relative path inside the source directory"
    return None


def build_input_problems(
    language: str, entrypoint: str, options: Mapping[str, object]
) -> list[tuple[Sequence[str], str]]:
    """Every problem of a workload's build inputs, as (JSON path under ``spec``, message)."""
    found: list[tuple[Sequence[str], str]] = []
    problem = entrypoint_problem(entrypoint)
    if problem is not None:
        found.append((("source", "entrypoint"), problem))
    for key, value in sorted(options.items()):
        where = ("build", "options", key)
        if key not in OPTIONS:
            found.append((where, f"unknown build option {key!r} (known: {', '.join(OPTIONS)})"))
            continue
        languages, _ = OPTIONS[key]
        if language not in languages:
            found.append((where, f"{key} applies to {', '.join(sorted(languages))} workloads only"))
            continue
        if not isinstance(value, str):
            found.append((where, f"{key} must be a string of flags"))
            continue
        try:
            checked_flags(key, value)
        except BuildError as exc:
            found.append((where, str(exc).removeprefix(f"{key}: ")))
    return found
