import sys

from netplane.cli import main

sys.exit(main())
