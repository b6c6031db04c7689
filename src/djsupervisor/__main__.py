"""`python -m djsupervisor ...`: the same as the `djsupervisor` command."""

import sys

from djsupervisor.cli import main

sys.exit(main())
