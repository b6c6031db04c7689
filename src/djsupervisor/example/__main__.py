"""``python -m djsupervisor.example``: the path of the example config shipped in the package."""

from djsupervisor.example import CONFIG

print(CONFIG)
