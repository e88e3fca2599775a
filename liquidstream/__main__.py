"""``python -m liquidstream``: the same command line as the ``liquidstream`` console script."""

import sys

from liquidstream.pipeline.cli import main

sys.exit(main())
