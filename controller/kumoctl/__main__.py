"""``python -m controller.kumoctl``: the same as the ``kumoctl`` console script."""

import sys

from controller.kumoctl import main

sys.exit(main())
