"""Pipelines that process tests run under the real `djsupervisor` (targets like "pipelines.supervised:standard")."""
