import sys

from kosmos.cli import main

sys.exit(main())
