"""``python -m KANTumorSegLib``: the same as the ``kantumorseg`` command."""

import sys

from .cli import command

sys.exit(command())
