"""``python -m aqcf``: the same program as the ``aqcf`` command."""

import sys

from aqcf.cli import main

sys.exit(main())
