"""A target module that raises on import (hostile-input tests)."""

raise RuntimeError("this module refuses to import")
