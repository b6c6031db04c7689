"""Settings declared once: README's table is the generated one, the config dataclasses, the autoscaler and
DataJointWorker take their defaults from the declarations, and every declared key round-trips through
load_config with its default and refuses a value out of its bounds with one line naming the key."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import TESTS, write_config

from djsupervisor import DataJointWorker
from djsupervisor.supervisor.autoscale import AutoscaleSettings, HostBudget
from djsupervisor.supervisor.config import ConfigError, DatabaseConfig, SupervisorConfig, WorkerConfig, load_config
from djsupervisor.supervisor.settings import (
    DATABASE_SETTINGS,
    POOL_SETTINGS,
    SUPERVISOR_SETTINGS,
    WORKER_OVERRIDES,
    main,
    markdown_table,
    names,
    readme_with_table,
    toml_value,
)
from djsupervisor.worker.settings import WORKER_SETTINGS, Setting

sys.path.insert(0, str(TESTS))

README = Path(__file__).resolve().parents[1] / "README.md"
WORKER_ENTRY = 'name = "w"\ntarget = "pipelines.offline:worker"\n'
#: (table, declaration) of every key a config file takes.
DECLARED = [
    *(("supervisor", s) for s in SUPERVISOR_SETTINGS),
    *(("database", s) for s in DATABASE_SETTINGS),
    *(("worker", s) for s in POOL_SETTINGS),
    *(("override", s) for s in WORKER_OVERRIDES),
]


def declared_id(case: tuple[str, Setting]) -> str:
    return f"{case[0]}.{case[1].name}"


def defaults_of(cls: type) -> dict[str, Any]:
    """Field name -> default of a dataclass (MISSING for a required field)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def config_text(table: str, setting: Setting, value: Any = None) -> str:
    """A config file whose `table` holds `setting` = `value` (the key left out when `value` is None)."""
    line = "" if value is None else f"{setting.name} = {toml_value(value)}\n"
    if table in ("supervisor", "database"):
        return f"[{table}]\n{line}[[worker]]\n{WORKER_ENTRY}"
    rows = WORKER_ENTRY.splitlines(keepends=True)
    entry = "".join(row for row in rows if not (line and row.startswith(f"{setting.name} =")))
    needs = f"{setting.requires} = 5\n" if setting.requires else ""
    return f"[[worker]]\n{entry}{needs}{line}"


def loaded_value(config: SupervisorConfig, table: str, name: str) -> Any:
    if table == "supervisor":
        return getattr(config, name)
    if table == "database":
        return getattr(config.database, name)
    if table == "worker":
        return getattr(config.workers[0], name)
    return getattr(config.workers[0].build_worker(), name)


def out_of_bounds(setting: Setting) -> Any:
    """A value `setting` refuses."""
    if setting.secret:
        return 42
    if setting.choices:
        return "bogus"
    if setting.kind is bool:
        return "yes"
    if setting.kind is str:
        return "*" if setting.max_length else "nonsense" if setting.form else ""
    if setting.maximum is not None:
        return setting.maximum + 1
    return setting.minimum if setting.exclusive else setting.minimum - 1


def test_readme_table_is_the_generated_one():
    text = README.read_text()
    assert readme_with_table(text) == text, "run: python -m djsupervisor.supervisor.settings --update README.md"
    assert markdown_table().count("\n") == 2 + len(DECLARED)  # header, rule, one row per key


def test_the_module_prints_and_writes_the_table(tmp_path, capsys):
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table()
    page = tmp_path / "README.md"
    page.write_text("intro\n<!-- settings-table:start -->\nold rows\n<!-- settings-table:end -->\nrest\n")
    assert main(["--update", str(page)]) == 0
    assert (
        page.read_text()
        == f"intro\n<!-- settings-table:start -->\n{markdown_table()}<!-- settings-table:end -->\nrest\n"
    )


def test_the_dataclasses_hold_exactly_the_declared_keys_and_defaults():
    supervisor = defaults_of(SupervisorConfig)
    assert names(SUPERVISOR_SETTINGS) == tuple(k for k in supervisor if k not in ("workers", "source", "database"))
    assert all(supervisor[s.name] == s.default for s in SUPERVISOR_SETTINGS if s.name != "name")
    assert defaults_of(DatabaseConfig) == {s.name: s.default for s in DATABASE_SETTINGS}
    pool = defaults_of(WorkerConfig)
    assert names(POOL_SETTINGS) == tuple(k for k in pool if k != "overrides")
    assert all(pool[s.name] == s.default for s in POOL_SETTINGS if not s.required)
    autoscale = {s.name: s.default for s in POOL_SETTINGS if s.requires == "max_replicas"}
    assert {k: v for k, v in defaults_of(AutoscaleSettings).items() if k != "max_replicas"} == autoscale
    assert defaults_of(HostBudget) == {k: supervisor[k] for k in ("max_cpu_percent", "min_available_memory_mb")}


def test_the_worker_settings_are_the_declared_ones_with_the_constructors_defaults():
    assert names(WORKER_SETTINGS) == DataJointWorker.SETTINGS
    parameters = inspect.signature(DataJointWorker.__init__).parameters
    assert {s.name: s.default for s in WORKER_SETTINGS} == {s.name: parameters[s.name].default for s in WORKER_SETTINGS}
    scope = next(s for s in WORKER_SETTINGS if s.name == "recovery_scope")
    assert DataJointWorker.RECOVERY_SCOPES == scope.choices == ("own", "db_prefix")


@pytest.mark.parametrize("table, setting", DECLARED, ids=map(declared_id, DECLARED))
def test_every_key_round_trips_with_its_default(tmp_path, table, setting):
    path = tmp_path / "lab.toml"
    absent = load_config(write_config(path, config_text(table, setting)), check_targets=table == "override")
    if not setting.required:
        expected = {"name": "lab"}.get(setting.name, setting.default) if table == "supervisor" else setting.default
        if table == "override":
            assert setting.name not in dict(absent.workers[0].overrides)
        else:
            assert loaded_value(absent, table, setting.name) == expected
    if setting.default is None or setting.default_text:
        return  # no value to write: "unset", or a default that depends on the machine or the file name
    given = load_config(write_config(path, config_text(table, setting, setting.default)), check_targets=True)
    assert loaded_value(given, table, setting.name) == setting.default
    if table == "override":
        assert dict(given.workers[0].overrides) == {setting.name: setting.default}


@pytest.mark.parametrize("table, setting", DECLARED, ids=map(declared_id, DECLARED))
def test_every_key_refuses_a_value_out_of_bounds_with_one_line_naming_it(tmp_path, table, setting):
    path = write_config(tmp_path / "lab.toml", config_text(table, setting, out_of_bounds(setting)))
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_targets=False)
    prefix = {"supervisor": "supervisor", "database": "database"}.get(table, "worker[0] (w)")
    if setting.name == "name" and table == "worker":
        prefix = "worker[0]"  # no usable name to show
    message = str(caught.value)
    assert caught.value.key == f"{prefix}.{setting.name}"
    assert "\n" not in message and message.startswith(f"{path}: {prefix}.{setting.name}: must"), message


@pytest.mark.parametrize(
    "table, known",
    [("supervisor", names(SUPERVISOR_SETTINGS)), ("database", names(DATABASE_SETTINGS))],
)
def test_an_unknown_key_lists_the_declared_ones(tmp_path, table, known):
    path = write_config(tmp_path / "lab.toml", f"[{table}]\nunheard_of = 1\n[[worker]]\n{WORKER_ENTRY}")
    with pytest.raises(ConfigError, match=rf"{table}\.unheard_of: unknown key \(known: {', '.join(known)}\)$"):
        load_config(path, check_targets=False)
    path = write_config(tmp_path / "lab.toml", f"[[worker]]\n{WORKER_ENTRY}unheard_of = 1\n")
    known = ", ".join(names(POOL_SETTINGS + WORKER_OVERRIDES))
    with pytest.raises(ConfigError, match=rf"worker\[0\] \(w\)\.unheard_of: unknown key \(known: {known}\)$"):
        load_config(path, check_targets=False)


def test_supervisor_numbers_are_floats_whatever_the_toml_number(tmp_path):
    config = load_config(
        write_config(tmp_path / "lab.toml", f"[supervisor]\nbackoff_max = 9\n[[worker]]\n{WORKER_ENTRY}")
    )
    assert config.backoff_max == 9.0 and isinstance(config.backoff_max, float)
