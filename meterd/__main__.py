import sys

from meterd.cli import main

sys.exit(main())
