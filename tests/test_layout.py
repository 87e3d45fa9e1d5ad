"""The package's layout rules: imports point one way, modules stay small, chores live once."""

import ast
import pathlib

import pytest

from conftest import REPO_ROOT

PACKAGE = pathlib.Path(REPO_ROOT) / "knowledge_distillation"
# Each component may import only components of a lower level (DESIGN.md;
# compat, the seam between Keras 2.6 and Keras 3, is below everything:
# cli -> train -> teacher_feed -> (quant, inputs) -> (kd, models, data, ascend, distribute)). train sits
# above quant because `--quantize` quantizes the distilled student.
LEVELS = {
    "compat": 0,
    "util": 1, "config": 1,
    "data": 2, "models": 2,
    "kd": 3, "ascend": 3, "distribute": 3, "callbacks": 3, "flags": 3, "rundir": 3,
    "quant": 4, "phase": 4, "inputs": 4,
    "teacher_feed": 5,
    "train": 6,
    "cli": 7,
    "__main__": 8,
}
MAX_LINES = 500


def _component(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield path, module.removesuffix(".__init__")


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _edges():
    for path, module in _modules():
        source = _component(module)
        for name in _imports(path):
            target = _component(name) if name.startswith("knowledge_distillation.") else None
            exists = target and ((PACKAGE / target).is_dir() or (PACKAGE / f"{target}.py").is_file())
            if exists and source and target != source:
                yield module, source, name, target


def test_every_component_has_a_level():
    components = {_component(module) for _, module in _modules()} - {None}
    assert components <= set(LEVELS), sorted(components - set(LEVELS))


def test_no_import_runs_upward_or_sideways():
    bad = [f"{module} imports {name}" for module, source, name, target in _edges()
           if LEVELS[target] >= LEVELS[source]]
    assert not bad, bad


@pytest.mark.parametrize("source, forbidden", [("quant", "train"), ("train", "cli"),
                                               ("quant", "cli"), ("kd", "train")])
def test_named_rules(source, forbidden):
    assert not [m for m, s, _, t in _edges() if s == source and t == forbidden]


def test_nothing_imports_cli():
    assert not [m for m, _, _, t in _edges() if t == "cli" and m != "knowledge_distillation.__main__"]


def test_no_module_is_over_500_lines():
    roots = [PACKAGE, pathlib.Path(REPO_ROOT) / "tests", pathlib.Path(REPO_ROOT) / "bench"]
    long = {str(p.relative_to(REPO_ROOT)): n for root in roots for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("needle, home", [
    ("os.replace(", "util/files.py"),           # atomic writes
    ("/proc/cpuinfo", "util/cpu.py"),           # CPU feature detection
    ("hashlib.sha256", None),                   # weight digests: util/digest.py (blake2b)
    (".get_weights():", "util/digest.py"),
    ("logging.StreamHandler(sys.stdout)", "util/logs.py"),
    ('"--help", "-help"', "flags.py"),
])
def test_each_chore_has_one_home(needle, home):
    holders = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if needle in p.read_text(encoding="utf-8"))
    assert holders == ([home] if home else []), holders
