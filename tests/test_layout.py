"""The shape of the code (docs/ARCHITECTURE.md §Layers): no import cycle among the library's modules
(function-local imports counted), `import heartbeat` imports no Triton and opens no file, modules stay
short or say why, and no module but heartbeat/stages.py branches on a stage's name."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("heartbeat", "kernels", "data_prep")


def _modules() -> dict:
    """dotted name -> path of every module of the library's packages."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return out


def _imports(name: str, path: Path, known: set) -> set:
    """The library modules `name` imports anywhere in its body (module level or inside functions)."""
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m, stack)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n, [])
            if c:
                return c
    return None


def test_no_import_cycle_counting_function_local_imports():
    mods = _modules()
    # a package's __init__ that imports nothing of its own does not make its submodules depend on it
    graph = {n: {m for m in _imports(n, p, set(mods)) if not (m in PACKAGES and n.startswith(m + "."))}
             for n, p in mods.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert "heartbeat.trainer" not in mods


def test_the_cycle_finder_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_heartbeat_loads_no_triton_and_opens_no_file():
    code = (
        "import sys\n"
        "opened = []\n"
        "def hook(event, args):\n"
        "    if event == 'open' and isinstance(args[0], str) and not args[0].endswith(('.py', '.pyc', '.so', '.pth')):\n"
        "        opened.append(args[0])\n"
        "sys.addaudithook(hook)\n"
        "import heartbeat\n"
        "import heartbeat.config, heartbeat.stages, heartbeat.models, heartbeat.sampling, heartbeat.preview\n"
        "import heartbeat.runs, heartbeat.weights, heartbeat.data, kernels\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "bad = [p for p in opened if not p.startswith((sys.prefix, sys.base_prefix, '/proc/', '/dev/', '/sys/'))]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_modules_are_short_or_say_why():
    long = []
    for pkg in PACKAGES + ("tools",):
        for p in (ROOT / pkg).glob("*.py"):
            n = len(p.read_text().splitlines())
            doc = ast.get_docstring(ast.parse(p.read_text())) or ""
            if n > 550 and "long because" not in doc.lower():
                long.append(f"{p.relative_to(ROOT)} ({n} lines)")
    assert not long, f"over ~500 lines without a reason at the top: {long}"


def _is_stage_name(node) -> bool:
    """`stage`, `cfg.train.stage`, `meta["stage"]`, `meta.get("stage")`: an expression holding a stage's name."""
    text = ast.unparse(node)
    return bool(re.search(r"(^|\.)stage$|\[['\"]stage['\"]\]$|\.get\(['\"]stage['\"]", text))


def _stage_name_branches(path: Path, names: set) -> list:
    """Comparisons of a stage's name with one of `names` (`stage == "pretrain"`, `t.stage in ("finetune",
    "cmr")`); the same words as values of other fields (`prior == "vae"`) are not stage names."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left] + node.comparators
            consts = [k for c in sides for k in (c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c])]
            if any(isinstance(k, ast.Constant) and k.value in names for k in consts) and any(map(_is_stage_name, sides)):
                hits.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}")
    return hits


def test_only_the_stage_table_knows_stage_names(tmp_path):
    from heartbeat.config import STAGES
    files = [p for p in (ROOT / "heartbeat").glob("*.py") if p.name != "stages.py"]
    files += [ROOT / "tools" / "train.py", ROOT / "tools" / "sample.py"]
    hits = [h for p in files for h in _stage_name_branches(p, set(STAGES))]
    assert not hits, hits
    probe = tmp_path / "_probe_stage_branch.py"
    probe.write_text("def f(stage, cfg, prior):\n    a = stage in ('finetune', 'cmr')\n    b = prior == 'vae'\n"
                     "    return a or cfg.train.stage == 'pretrain'\n")
    assert _stage_name_branches(probe, set(STAGES)) == ["_probe_stage_branch.py:2", "_probe_stage_branch.py:4"]


@pytest.mark.parametrize("name", ["vae", "pretrain", "finetune", "cmr", "seg"])
def test_every_stage_is_described_once(name):
    from heartbeat.stages import get_stage
    s = get_stage(name)
    assert s.name == name and s.items in ("frames", "clips") and s.model in ("vae", "ldm", "seg")
    assert all(p in ("vae", "pretrain", "finetune", "cmr") for p in s.starts_from)
    assert (s.init == "previous") == bool(s.starts_from and s.starts_from[0] != name)
