"""The architecture's rules, checked: the parent imports no database code, and modules stay small.

ARCHITECTURE.md explains the process roles. The supervisor's parent process forks its children; a DataJoint
connection or a database driver loaded in the parent would be inherited by every child (and its socket shared
across fork), and a parent that waits on the database cannot supervise. So the packages the parent runs
(`supervisor`, `serve`, `fleet.view` and the command line) import no DataJoint, no driver and nothing of the
`worker` package at module level; the child's code imports the worker after fork.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "djsupervisor"
PARENT_PACKAGES = ("supervisor", "serve")
PARENT_MODULES = (
    "cli.py",
    "cli_check.py",
    "credentials.py",
    "cli_control.py",
    "preflight.py",
    "log.py",
    "protocol.py",
    "fleet/view.py",
    "fleet/link.py",
)
DATABASE_MODULES = ("datajoint", "pymysql", "psycopg2", "djsupervisor.worker")
#: Modules of the worker package that hold declarations only (no DataJoint, no I/O): the parent may use them.
PURE_WORKER_MODULES = ("djsupervisor.worker.settings", "djsupervisor.worker.events", "djsupervisor.worker.identifiers")


def _is_database_module(name: str) -> bool:
    return name.startswith(DATABASE_MODULES) and name not in (*PURE_WORKER_MODULES, "djsupervisor.worker")


MAX_LINES = 450  # DEVELOPERS.md: "no module over ~450 lines"

pytestmark = pytest.mark.timeout(60)


def _parent_files() -> list[Path]:
    files = [p for package in PARENT_PACKAGES for p in (SRC / package).glob("*.py")]
    return files + [SRC / name for name in PARENT_MODULES if (SRC / name).exists()]


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported by statements that run at import time (not inside a function or class body)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", _parent_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_parent_modules_import_no_database_code_at_module_level(path):
    bad = [name for name in _module_level_imports(path) if _is_database_module(name)]
    assert not bad, f"{path.relative_to(SRC)} imports {bad} at module level; import it in the child instead"


def test_starting_the_parent_loads_no_database_module():
    """The whole import graph at run time, transitive imports included."""
    modules = ["djsupervisor.cli", "djsupervisor.supervisor.arbiter", "djsupervisor.serve.http"]
    code = f"import sys; import {', '.join(modules)}; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    loaded = [name for name in ast.literal_eval(out.stdout) if _is_database_module(name)]
    assert loaded == []


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
