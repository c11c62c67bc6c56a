"""dvc.yaml keeps its promise that a change reruns exactly the stages it affects: every lib module a
stage's notebook imports, directly or through other lib modules, is a declared dependency, and every
params section the notebook reads (directly, or through a lib function it hands the params to) is a
declared param. Also: the stage command finds the study's interpreter from a plain shell."""
import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

LIB = ROOT / "lib"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SECTIONS = {"seed", "device", "allow_network", "data", "data_prep", "prototypes", "ldm_finetune", "guided_sampling",
            "dino_pretrain", "fid_umap_coverage", "linear_probe"}


def notebook_code(stage: str) -> str:
    (nb,) = (ROOT / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb")
    cells = json.loads(nb.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def module_file(name: str) -> Path | None:
    """pathsynth.a.b -> lib/pathsynth/a/b.py (or the package's __init__.py)."""
    if not name.startswith("pathsynth"):
        return None
    base = LIB / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imports_of(tree: ast.AST, current: str) -> set[Path]:
    """Every pathsynth module an AST imports (at any depth: lazy imports inside functions count)."""
    found = set()
    pkg = current.rsplit(".", 1)[0] if current else ""
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
        for n in names:
            f = module_file(n)
            if f:
                found.add(f)
    return found


def closure(stage: str) -> set[Path]:
    todo = imports_of(ast.parse(notebook_code(stage)), "")
    seen = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        rel = f.relative_to(LIB).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if rel.name == "__init__":
            name += ".__init__"
        todo |= imports_of(ast.parse(f.read_text()), name) - seen
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_lib_module_is_a_declared_dependency(stage):
    deps = [ROOT / d for d in STAGES[stage]["deps"]]
    covered = lambda f: any(f == d or d in f.parents for d in deps)  # noqa: E731
    trivial = {LIB / "pathsynth" / "__init__.py"}
    missing = sorted(str(f.relative_to(ROOT)) for f in closure(stage) - trivial if not covered(f))
    assert missing == [], f"stage '{stage}' imports these lib modules without declaring them in dvc.yaml"


def _functions() -> dict[str, str]:
    out = {}
    for f in (LIB / "pathsynth").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                out.setdefault(node.name, ast.get_source_segment(f.read_text(), node))
    return out


def params_read(code: str, handle: str, functions: dict, depth: int = 0) -> set[str]:
    """Sections read as handle.<section>, and (recursively) by lib functions handed ``handle``."""
    found = set(re.findall(rf"\b{handle}\.(\w+)", code)) & SECTIONS
    if depth < 3:
        for fn in set(re.findall(rf"(\w+)\([^()]*\b{handle}\b[^()]*\)", code)):
            if fn in functions:
                found |= params_read(functions[fn], "params", functions, depth + 1)
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_params_section_a_stage_reads_is_declared(stage):
    if "params.yaml" in STAGES[stage]["deps"]:
        return  # the report depends on the whole file: it compares every setting with the profile
    code = notebook_code(stage).replace("ctx.params", "P")
    used = params_read(code, "P", _functions())
    assert used, "the check found no params at all: the pattern is wrong"
    declared = set(STAGES[stage]["params"])
    assert used - declared == set(), f"stage '{stage}' reads params not declared in dvc.yaml"


def test_declared_outputs_are_written_unconditionally():
    """A figure written only on some data (the phantom) cannot be a declared output: DVC would fail."""
    for stage, spec in STAGES.items():
        code = notebook_code(stage)
        for out in spec["outs"]:
            out = next(iter(out)) if isinstance(out, dict) else out  # `- path: {cache: false}`
            m = re.match(r"reports/figures/" + stage + r"_(\w+)\.png", out)
            if m:
                assert f'figure_path("{m.group(1)}")' in code, f"{out} is declared but the notebook never writes it"


def test_stage_command_finds_the_study_interpreter_from_a_plain_shell(tmp_path):
    """bin/stage, with no venv on PATH, no VIRTUAL_ENV and no PATHSYNTH_PYTHON, finds the checkout's .venv;
    where there is none and no python3 can run the study, it says how to make one."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    venv = ROOT / ".venv" / "bin" / "python"
    if not venv.exists():
        pytest.skip("no .venv in the checkout (make setup makes it)")
    r = subprocess.run([str(ROOT / "bin" / "stage"), "no_such_stage"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    # papermill's runner was reached (it names the stages), so the interpreter was found
    assert "no notebook for stage 'no_such_stage'" in r.stderr, r.stderr[-2000:]
    # and from a copy of the study below the checkout (dvc exp run --temp works in .dvc/tmp/exps/...)
    sub = tmp_path / "none"
    sub.mkdir()
    (sub / "bin").mkdir()
    (sub / "bin" / "stage").write_bytes((ROOT / "bin" / "stage").read_bytes())
    (sub / "bin" / "stage").chmod(0o755)
    r = subprocess.run([str(sub / "bin" / "stage"), "x"], cwd=sub, env={**env, "PATH": "/nonexistent"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 127 and "Run 'make setup'" in r.stderr
