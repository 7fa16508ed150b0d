"""``loraserve-client`` stays light: httpx and pydantic only, never torch, installable on its own."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "litserve",
    "fastapi",
    "numpy",
    "safetensors",
    "trainer",
    "service",
)
# Imported lazily and only when present (tqdm: progress bar, yaml: --config x.yaml) or only by type checkers.
OPTIONAL = {"tqdm", "yaml", "typing_extensions"}


def test_client_imports_only_httpx_pydantic_and_the_standard_library():
    allowed = {"httpx", "pydantic", "loraserve_client"} | OPTIONAL | set(sys.stdlib_module_names)
    for path in sorted((CLIENT / "loraserve_client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name}:{node.lineno} imports {name}"


def test_client_modules_import_each_other_in_one_direction_only():
    # Every relative import counts, lazy ones too: a cycle (say _exceptions -> _core -> _exceptions)
    # means two modules that cannot be read, or loaded, apart.
    deps: dict[str, set[str]] = {}
    for path in sorted((CLIENT / "loraserve_client").glob("*.py")):
        found = deps.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module] if node.module else [a.name for a in node.names])

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in deps.get(start, ()):
            if dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})):
                return True
        return False

    cycles = sorted(m for m in deps if m != "__init__" and reaches(m, m, {m}))
    assert not cycles, f"import cycle through {cycles}"


def test_client_and_cli_import_with_heavy_packages_blocked():
    # Fails if anything on the import path of the package or its CLI reaches for torch & co.
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import loraserve_client, loraserve_client.cli
from loraserve_client import Client, AsyncClient
Client("http://127.0.0.1:1").close()
loraserve_client.cli.main(["--version"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CLIENT)
    assert proc.returncode == 0 and proc.stdout.strip() == "loraserve-client 0.1.0", proc.stderr


@pytest.mark.slow
def test_client_installs_into_a_fresh_venv_without_torch(tmp_path: Path):
    # Built from a copy, so the build leaves nothing in the source tree.
    source = shutil.copytree(CLIENT, tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "build"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    proc = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        if any(
            s in proc.stderr
            for s in ("No matching distribution", "Failed to establish", "NewConnectionError")
        ):
            pytest.skip(f"no package index reachable: {proc.stderr.strip().splitlines()[-1]}")
        pytest.fail(proc.stderr)
    check = (
        "import sys, loraserve_client, loraserve_client.cli; "
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); "
        "assert not heavy, heavy; print(loraserve_client.__version__)"
    )
    out = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "0.1.0", out.stderr
    installed = subprocess.run(
        [py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    names = {line.split("==")[0].lower() for line in installed.split()}
    assert not names & {"torch", "transformers", "numpy"}, names
    cli = subprocess.run([env_dir / "bin" / "loraserve", "--version"], capture_output=True, text=True)
    assert cli.stdout.strip() == "loraserve-client 0.1.0", cli.stderr
