"""The documentation still matches the code: README.md and docs/*.md.

Every shell command shown (in ```bash/```sh/``` blocks, and inline `python ...`
or `bash ...` spans) is checked without running it:

- trainer commands (`python -m knowledge_distillation`, `python
  knowledge_distillation.py`, `knowledge-distillation`, and the ModelZoo
  launch scripts `test/train_*.sh`, which pass their flags on): every `--flag`
  is a trainer flag (`--noflag` for booleans);
- quantizer commands (`python -m knowledge_distillation.quant`,
  `kd-quantize`): every `--flag` is a quantizer flag;
- `bash X.sh`: the script exists (relative to the repository root, or to the
  folder a `cd` earlier in the same block went to);
- `python bench/X.py`: the file exists and defines each `--flag` (in its own
  source, or in the `bench/common.py` function it calls); benchmarks define
  flags at import time, so they are read, not imported;
- `pytest` / `python -m pytest`: the test paths exist;
- any other `python` command is an error, so a new kind of command gets a
  check here.

Also: README.md is under 250 lines and keeps its set-up commands, and every
relative link (and `#anchor`) in these files resolves.
"""

import functools
import glob
import importlib
import os
import re

import pytest
import shlex

from conftest import REPO_ROOT, keras3_only

README = os.path.join(REPO_ROOT, "README.md")
README_MAX_LINES = 250
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "$", ";;"}
REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", "2>", ">|"}
PREFIX_WORDS = {"do", "then", "else", "time", "nohup", "exec", "sudo", "env"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FLAG = re.compile(r"^\[?--([A-Za-z_][A-Za-z0-9_]*)")
PYTHON = re.compile(r"^python(3(\.\d+)?)?$")
COMMAND_WORDS = ("bash", "sh", "pytest", "knowledge-distillation", "kd-quantize")


def _doc_files():
    return [README] + sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))


def _rel(path):
    return os.path.relpath(path, REPO_ROOT)


# ---------------------------------------------------------------- markdown


def _split_markdown(text):
    """(blocks, prose): fenced blocks as (lang, [(lineno, line)]); prose as [(lineno, line)]."""
    blocks, prose, block = [], [], None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if block is None and stripped.startswith("```"):
            block = (stripped[3:].strip().lower(), [])
        elif block is not None and stripped.startswith("```"):
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append((number, line))
        else:
            prose.append((number, line))
    return blocks, prose


def _paragraphs(prose):
    """Prose lines grouped into paragraphs (blank lines split them): [(lineno, text)]."""
    paragraphs, current = [], []
    for number, line in prose + [(None, "")]:
        if line.strip():
            current.append((number, line))
        elif current:
            paragraphs.append((current[0][0], "\n".join(text for _, text in current)))
            current = []
    return paragraphs


def _without_inline_code(text):
    return re.sub(r"`[^`]*`", "", text)


# ------------------------------------------------------------------- shell


def _tokens(text):
    """Shell words and operators of `text` (quotes removed, comments dropped)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _logical_lines(lines):
    """[(lineno, text)] of a shell block: comments dropped, `\\` continuations and
    multi-line quotes joined."""
    logical, buffer, start = [], "", None
    for number, line in lines:
        if not buffer and (not line.strip() or line.strip().startswith("#")):
            continue
        if not buffer:
            start = number
        buffer = f"{buffer}\n{line}" if buffer else line
        if buffer.rstrip().endswith("\\"):
            buffer = buffer.rstrip()[:-1] + " "
            continue
        try:
            _tokens(buffer)
        except ValueError:  # a quote opened on this line closes on a later one
            if buffer.count("\n") < 10:
                continue
        logical.append((start, buffer))
        buffer = ""
    if buffer:
        logical.append((start, buffer))
    return logical


def _simple_commands(text):
    """The simple commands of a shell line, as word lists without redirections."""
    try:
        tokens = _tokens(text)
    except ValueError:  # not shell (an output line, say)
        tokens = text.split()
    commands, current, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in SEPARATORS or re.fullmatch(r"[();|&]+", token):
            commands.append(current)
            current = []
        elif token in REDIRECTS or re.fullmatch(r"[0-9]*[<>&|]*[<>][<>&|]*", token):
            skip = True
            if current and current[-1].isdigit():
                current.pop()
        else:
            current.append(token)
    commands.append(current)
    out = []
    for words in commands:
        while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in PREFIX_WORDS):
            words = words[1:]
        if words:
            out.append(words)
    return out


class Command:
    """One shell command shown in the docs."""

    def __init__(self, path, lineno, words, cwd):
        self.path, self.lineno, self.words, self.cwd = path, lineno, words, cwd

    def where(self):
        return f"{_rel(self.path)}:{self.lineno}: {' '.join(self.words)}"

    def flags(self):
        return [m.group(1) for m in (FLAG.match(w) for w in self.words) if m]


def _commands_of_line(path, lineno, text, cwd):
    """Commands of one shell line; returns (commands, the cwd after a `cd`)."""
    commands = []
    for words in _simple_commands(text):
        if words[0] == "cd" and len(words) > 1:
            cwd = os.path.normpath(os.path.join(cwd, words[1]))
        elif words[0] in COMMAND_WORDS or (PYTHON.match(words[0]) and len(words) > 1):
            commands.append(Command(path, lineno, words, cwd))
    return commands, cwd


@functools.lru_cache(maxsize=None)
def _doc_commands():
    commands = []
    for path in _doc_files():
        with open(path, encoding="utf-8") as f:
            blocks, prose = _split_markdown(f.read())
        for lang, lines in blocks:
            if lang not in SHELL_LANGS:
                continue
            cwd = REPO_ROOT
            for lineno, text in _logical_lines(lines):
                found, cwd = _commands_of_line(path, lineno, text, cwd)
                commands += found
        for lineno, paragraph in _paragraphs(prose):
            for match in re.finditer(r"`([^`]+)`", paragraph):
                span = match.group(1).replace("\n", " ")
                found, _ = _commands_of_line(
                    path, lineno + paragraph[:match.start()].count("\n"), span, REPO_ROOT)
                commands += found
    return tuple(commands)


def _kind(command):
    """What a command runs: trainer, quantizer, pytest, bench, script, python, bash."""
    words = command.words
    first = words[0]
    if first == "knowledge-distillation":
        return "trainer", words[1:]
    if first == "kd-quantize":
        return "quantizer", words[1:]
    if first == "pytest":
        return "pytest", words[1:]
    if PYTHON.match(first):
        args = words[1:]
        while args and args[0] in ("-u", "-O", "-B"):
            args = args[1:]
        if len(args) >= 2 and args[0] == "-m":
            module = {"knowledge_distillation": "trainer",
                      "knowledge_distillation.quant": "quantizer",
                      "pytest": "pytest"}.get(args[1])
            return module or "python", args[2:]
        if args and args[0].endswith(".py"):
            script = os.path.normpath(args[0])
            if script == "knowledge_distillation.py":
                return "trainer", args[1:]
            if script.startswith("bench" + os.sep):
                return "bench", args
            return "script", args
        return "python", args
    if first in ("bash", "sh"):
        return "bash", words[1:]
    return "other", words


def _commands_of(*kinds):
    return [c for c in _doc_commands() if _kind(c)[0] in kinds]


# ------------------------------------------------------------------- flags


def _flag_spellings(fv):
    """Every accepted `--name` of a FlagValues: names, and `noname` for booleans."""
    names = set(fv)
    names |= {"no" + name for name in fv if getattr(fv[name], "boolean", False)}
    return names


def _define_first(candidates, fv):
    """Calls the first (module, function) of `candidates` that exists on `fv`."""
    errors = []
    for module_name, function in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            errors.append(f"{module_name}: {e}")
            continue
        if hasattr(module, function):
            getattr(module, function)(fv)
            return
        errors.append(f"{module_name} has no {function}")
    raise AssertionError("no flag definitions found: " + "; ".join(errors))


@functools.lru_cache(maxsize=None)
def _trainer_flag_names():
    from absl import flags

    fv = flags.FlagValues()
    _define_first([("knowledge_distillation.flags", "define_trainer_flags"),
                   ("knowledge_distillation.cli", "define_flags")], fv)
    return frozenset(_flag_spellings(fv))


@functools.lru_cache(maxsize=None)
def _quantizer_flag_names():
    from absl import flags

    fv = flags.FlagValues()
    _define_first([("knowledge_distillation.flags", "define_quantizer_flags"),
                   ("knowledge_distillation.flags", "define_quantize_flags"),
                   ("knowledge_distillation.quant.cli", "define_flags"),
                   ("knowledge_distillation.quant.quantize_cli", "define_flags")], fv)
    return frozenset(_flag_spellings(fv))


_DEFINE = re.compile(r"DEFINE_(\w+)\(\s*[\"'](\w+)[\"']")


def _defined_names(source):
    names = set()
    for kind, name in _DEFINE.findall(source):
        names.add(name)
        if kind in ("bool", "boolean"):
            names.add("no" + name)
    return names


@functools.lru_cache(maxsize=None)
def _bench_flag_names(script):
    """Flags of a bench script: its own DEFINE_s, bench/common.py's module-level ones
    and those of each bench/common.py function it calls."""
    with open(script, encoding="utf-8") as f:
        source = f.read()
    names = _defined_names(source)
    common = os.path.join(REPO_ROOT, "bench", "common.py")
    if os.path.exists(common):
        with open(common, encoding="utf-8") as f:
            common_source = f.read()
        # Split common.py into its module level and its top-level functions.
        parts = re.split(r"^def (\w+)\(", common_source, flags=re.M)
        names |= _defined_names(parts[0])
        for function, body in zip(parts[1::2], parts[2::2]):
            body = re.split(r"\n(?=\S)", body, maxsplit=1)[0]
            if re.search(rf"\bcommon\.{function}\(", source):
                names |= _defined_names(body)
    return frozenset(names)


def _unknown_flags(command, known):
    return [f"--{flag}" for flag in command.flags() if flag not in known]


# ------------------------------------------------------------------- tests


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} and move "
        "reference material to docs/")


def test_readme_keeps_setup_commands_and_results_heading():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for line in ("bash setup.sh && python3 -m knowledge_distillation --epoch 5",
                 "bash setup.sh --stack all && python3 -m pytest -q -n 2 --dist loadfile tests && "
                 ".venv-tf265/bin/python -m pytest -q -n 2 --dist loadfile tests",
                 "## Set-up: two commands",
                 "## Results (measured here)"):
        assert line in text.splitlines(), f"README.md lost the line {line!r}"


def test_commands_are_found():
    """The extraction sees the commands it is meant to check."""
    kinds = {_kind(c)[0] for c in _doc_commands()}
    for kind in ("trainer", "quantizer", "bash", "bench", "pytest"):
        assert kind in kinds, f"no {kind} command found in the docs: is the extraction broken?"
    readme = [c for c in _doc_commands() if c.path == README]
    assert any(c.words[:2] == ["bash", "setup.sh"] for c in readme)
    assert any(c.words[:3] == ["python3", "-m", "pytest"] for c in readme)


def test_every_command_is_checked():
    unknown = [c.where() for c in _doc_commands() if _kind(c)[0] in ("python", "other")]
    assert not unknown, ("commands this test does not know how to check "
                         "(add a rule to tests/test_docs.py):\n" + "\n".join(unknown))


def test_trainer_commands_use_trainer_flags():
    known = _trainer_flag_names()
    commands = _commands_of("trainer")
    assert commands
    bad = [f"{c.where()}\n    unknown: {', '.join(_unknown_flags(c, known))}"
           for c in commands if _unknown_flags(c, known)]
    assert not bad, "trainer flags that do not exist:\n" + "\n".join(bad)


@keras3_only
def test_quantizer_commands_use_quantizer_flags():
    known = _quantizer_flag_names()
    commands = _commands_of("quantizer")
    assert commands
    bad = [f"{c.where()}\n    unknown: {', '.join(_unknown_flags(c, known))}"
           for c in commands if _unknown_flags(c, known)]
    assert not bad, "quantizer flags that do not exist:\n" + "\n".join(bad)


def test_shell_scripts_exist_and_launch_scripts_take_trainer_flags():
    bad = []
    for command in _commands_of("bash"):
        args = [a for a in _kind(command)[1] if not a.startswith("-")]
        if not args:
            bad.append(f"{command.where()}\n    no script named")
            continue
        script = os.path.normpath(os.path.join(command.cwd, args[0]))
        if not os.path.isfile(script):
            bad.append(f"{command.where()}\n    {_rel(script)} does not exist")
            continue
        # The ModelZoo launch scripts pass every --key=value on to the trainer.
        if _rel(script).startswith(os.path.join("test", "train_")):
            known = _trainer_flag_names() | {"help"}
            unknown = _unknown_flags(command, known)
            if unknown:
                bad.append(f"{command.where()}\n    not trainer flags: {', '.join(unknown)}")
    assert not bad, "broken bash commands:\n" + "\n".join(bad)


def test_python_scripts_exist():
    bad = []
    for command in _commands_of("script"):
        script = os.path.join(command.cwd, _kind(command)[1][0])
        if not os.path.isfile(script):
            bad.append(f"{command.where()}\n    {_rel(script)} does not exist")
    assert not bad, "missing scripts:\n" + "\n".join(bad)


def test_bench_commands_use_defined_flags():
    commands = _commands_of("bench")
    assert commands
    bad = []
    for command in commands:
        script = os.path.normpath(os.path.join(command.cwd, _kind(command)[1][0]))
        if not os.path.isfile(script):
            bad.append(f"{command.where()}\n    {_rel(script)} does not exist")
            continue
        unknown = _unknown_flags(command, _bench_flag_names(script))
        if unknown:
            bad.append(f"{command.where()}\n    not defined by {_rel(script)}: "
                       f"{', '.join(unknown)}")
    assert not bad, "broken benchmark commands:\n" + "\n".join(bad)


def test_pytest_paths_exist():
    bad = []
    for command in _commands_of("pytest"):
        args, skip = [], False
        for word in _kind(command)[1]:
            if skip:
                skip = False
            elif word in ("-k", "-m", "-p", "-c", "-n", "--dist", "--rootdir"):
                skip = True
            elif not word.startswith("-"):
                args.append(word.split("::")[0])
        for arg in args:
            if not glob.glob(os.path.join(command.cwd, arg)):
                bad.append(f"{command.where()}\n    {arg} matches nothing")
    assert not bad, "pytest paths that do not exist:\n" + "\n".join(bad)


def _slug(heading):
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(path):
    with open(path, encoding="utf-8") as f:
        _, prose = _split_markdown(f.read())
    anchors, seen = set(), {}
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_resolve():
    bad, checked = [], 0
    for path in _doc_files():
        with open(path, encoding="utf-8") as f:
            _, prose = _split_markdown(f.read())
        for lineno, paragraph in _paragraphs(prose):
            text = _without_inline_code(paragraph)
            for match in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
                target = match.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                    continue  # https:, mailto: ...
                checked += 1
                file_part, _, anchor = target.partition("#")
                full = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                        if file_part else path)
                where = f"{_rel(path)}:{lineno}: ({target})"
                if not os.path.exists(full):
                    bad.append(f"{where}: {_rel(full)} does not exist")
                elif anchor and full.endswith(".md") and anchor not in _anchors(full):
                    bad.append(f"{where}: no heading #{anchor} in {_rel(full)}")
    assert checked, "no relative links found: is the extraction broken?"
    assert not bad, "broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", ["trainer.md", "device.md", "quantization.md",
                                  "distributed.md", "performance.md", "results.md",
                                  "stacks.md"])
def test_docs_pages_are_linked_from_readme_and_index(name):
    for index, link in ((README, f"docs/{name}"),
                        (os.path.join(REPO_ROOT, "docs", "README.md"), name)):
        with open(index, encoding="utf-8") as f:
            text = f.read()
        assert f"]({link}" in text, f"{_rel(index)} does not link {link}"
