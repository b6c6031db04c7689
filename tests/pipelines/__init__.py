"""The test pipeline (`lab`), the workers process tests run under the real `djsupervisor` (`workers`, and
`supervised` for targets like "pipelines.supervised:standard"), and tiny modules that exist to be broken
(`broken`, `raises_on_import`, `offline`, `empty`). Importable as `pipelines` because pytest puts tests/ on
sys.path (pyproject's `pythonpath`) and `db.env` puts it on every subprocess's PYTHONPATH."""
