"""`python -m djsupervisor ...`: the same as the `djsupervisor` command."""

import sys

from .cli import main

sys.exit(main())
