"""``python -m cnf`` is the ``cnf`` command."""

import sys

from cnf.cli import main

sys.exit(main())
