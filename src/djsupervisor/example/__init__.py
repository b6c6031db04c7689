"""The example pipeline, its config and its demo, shipped in the package so that an installed wheel runs them.

- `djsupervisor.example.pipeline`: a small but real DataJoint 2.x pipeline (importing it declares its tables,
  so it connects);
- ``djsupervisor.toml`` beside this file (`CONFIG`): pools of its two workers; ``python -m djsupervisor.example``
  prints its path, for ``djsupervisor start -c "$(python -m djsupervisor.example)"``;
- `djsupervisor.example.demo`: seeds the pipeline and works it under ``djsupervisor start``;
- `djsupervisor.example.command`: ``djsupervisor demo``, which finds a database for the demo or starts the
  embedded PostgreSQL (`djsupervisor.embedded`).

Nothing here imports DataJoint at import time but the pipeline itself.
"""

from pathlib import Path

#: The example pipeline's supervisor config.
CONFIG = Path(__file__).with_name("djsupervisor.toml")
