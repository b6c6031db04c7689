"""A real wheel (issue 14): what `pip install djsupervisor` gives a user, built and used without the checkout.

`python -m build` makes the sdist and the wheel (in an isolated build environment, as a packager would),
`twine check` passes both, the sdist carries the systemd units, the examples and the docs, and the wheel
installed alone in a fresh virtual environment — run from a directory outside the checkout, no PYTHONPATH —
answers `djsupervisor --version`, `check`s the example config it ships (`python -m djsupervisor.example`
prints its path) and works the example pipeline under `djsupervisor start` (`djsupervisor demo`) on the
test database. pip's cache is left on (no --no-cache-dir); the test takes about 2 minutes (README: Tests).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import djsupervisor

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.wheel, pytest.mark.process]


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)], 400)
    (wheel,) = out.glob("djsupervisor-*.whl")
    (sdist,) = out.glob("djsupervisor-*.tar.gz")
    return dict(wheel=wheel, sdist=sdist)


@pytest.mark.timeout(500)
def test_build_makes_a_wheel_and_an_sdist_twine_accepts(dist):
    assert dist["wheel"].name.startswith(f"djsupervisor-{djsupervisor.__version__}-py3-none-any")
    result = run([sys.executable, "-m", "twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])], 120)
    assert result.stdout.count("PASSED") == 2, result.stdout


@pytest.mark.timeout(500)
def test_the_sdist_carries_the_units_examples_and_docs(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    expected = {
        "systemd/djsupervisor.service",
        "systemd/djsupervisor@.service",
        "examples/djsupervisor.toml",
        "examples/docker-compose.yml",
        "examples/fleet/djsupervisor.toml",
        "src/djsupervisor/example/djsupervisor.toml",
        "README.md",
        "CHANGELOG.md",
        "MIGRATING.md",
        "scripts/demo",
    }
    assert expected <= names, sorted(expected - names)
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        packaged = set(wheel.namelist())
    assert {"djsupervisor/example/djsupervisor.toml", "djsupervisor/py.typed", "djsupervisor/embedded.py"} <= packaged
    assert not [name for name in packaged if name.startswith(("tests/", "examples/", "scripts/"))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # with the postgres extra; one install
def test_the_wheel_alone_checks_and_works_the_example_pipeline(dist, db, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], 120)
    python, djs = str(venv / "bin" / "python"), str(venv / "bin" / "djsupervisor")
    # the wheel and its dependencies from the registry (pip's own cache left on), never the checkout
    run([python, "-m", "pip", "install", "--quiet", f"{dist['wheel']}[postgres]"], 400, cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in db.env.items() if k != "PYTHONPATH"}
    env.update(DJS_EXAMPLE_PREFIX=db.prefix, DJS_EXAMPLE_SLOW_SECONDS="0.05")
    env.update(DJS_DEMO_LOG=str(tmp_path / "supervisor.log"), DJSUPERVISOR_RUNTIME_DIR=str(tmp_path / "run"))
    where = run([python, "-c", "import djsupervisor; print(djsupervisor.__file__)"], 60, cwd=outside, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    version = run([djs, "--version"], 60, cwd=outside, env=env)
    assert version.stdout.strip() == f"djsupervisor {djsupervisor.__version__}"

    config = run([python, "-m", "djsupervisor.example"], 60, cwd=outside, env=env).stdout.strip()
    assert config.startswith(str(venv)) and Path(config).is_file()
    checked = run([djs, "check", "-c", config], 120, cwd=outside, env=env)
    assert "standard" in checked.stdout and "analysis" in checked.stdout, checked.stdout

    demo = run([djs, "demo"], 300, cwd=outside, env=env)  # seeds, `djsupervisor start`, status, stop --wait
    assert f"djsupervisor start -c {config}" in demo.stdout, demo.stdout
    assert "WORKER    SLOT  PID" in demo.stdout  # `djsupervisor status` of the running supervisor
    assert "every session analysed" in demo.stdout and "the supervisor exited with status 0" in demo.stdout
    assert not list(outside.iterdir())  # nothing was written next to the user
