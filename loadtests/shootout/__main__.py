"""`python -m loadtests.shootout`."""

import sys

from loadtests.shootout import main

sys.exit(main())
