"""The house rules, checked: one concept per module (at most 500 lines), functions of at most 80 lines of
code, a thin command line (under 400 lines), a curated top-level API (at most 30 names, each documented
in the README's table), and ruff clean (configured in ``pyproject.toml``)."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ntksap_jax"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _code_lines(fn: ast.FunctionDef) -> int:
    """Lines of a function's body, its docstring aside."""
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:] or body
    return fn.end_lineno - body[0].lineno + 1


def test_modules_stay_under_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them by concept): {long}"


def test_functions_stay_under_80_lines_of_code():
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (n := _code_lines(node)) > 80:
                long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over 80 lines of code: {long}"


def test_the_command_line_is_thin():
    n = len((PACKAGE / "cli.py").read_text().splitlines())
    assert n < 400, f"cli.py has {n} lines: the workflows belong in the library (ntksap_jax.runs, preset_runs)"


def test_the_top_level_api_is_curated_and_in_the_readme():
    import ntksap_jax

    names = ntksap_jax.__all__
    assert len(names) <= 30 and len(set(names)) == len(names), names
    assert all(hasattr(ntksap_jax, n) for n in names)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Public API"):]
    listed = re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_.]*)` \|", table, re.M)
    top = [n for n in listed if "." not in n]
    assert sorted(top) == sorted(names), f"README table vs __all__: missing {sorted(set(names) - set(top))}, " \
                                         f"extra {sorted(set(top) - set(names))}"
    for ns in (n for n in listed if "." in n):  # namespaces: ntksap_jax.<module>
        module = __import__(ns, fromlist=["_"])
        assert module.__doc__, ns


def test_ruff_is_clean():
    ruff = str(pathlib.Path(sys.prefix) / "bin" / "ruff")
    ruff = ruff if pathlib.Path(ruff).exists() else shutil.which("ruff")
    assert ruff, "ruff is not installed: it is in the [dev] extra (pip install -e '.[dev]')"
    proc = subprocess.run([ruff, "check", "--no-cache", "ntksap_jax", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_benchmark_answers_help_and_writes_nothing(tmp_path):
    """Every script in benchmarks/ parses --help (importing it has no side effect: no file opened or written)."""
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 8
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir(), out.mkdir()
    for script in scripts:
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "OUT": str(out), "HOME": str(tmp_path / "home")},
                              timeout=300)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script.name, proc.stderr[-2000:])
    assert not any(cwd.iterdir()) and not any(out.iterdir()), sorted(p.name for p in [*cwd.iterdir(), *out.iterdir()])
