"""``python -m gateway.cli``: the ``fedgate`` command (``make demo`` runs it this way)."""

import sys

from gateway.cli import main

sys.exit(main())
