"""``python -m opgen.cli``: the ``opgen`` command (how the tuner starts its worker processes)."""
import sys

from . import main

sys.exit(main())
