"""`python -m meterd.simulate`: see meterd/simulate/__init__.py."""

import sys

from meterd.simulate.command import main

sys.exit(main())
