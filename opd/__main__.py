import sys

from opd.cli import main

sys.exit(main())
