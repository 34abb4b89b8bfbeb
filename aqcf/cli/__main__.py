"""``python -m aqcf.cli``: the ``aqcf`` program."""

import sys

from aqcf.cli import main

sys.exit(main())
