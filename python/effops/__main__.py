"""``python -m effops ...`` is the ``effops`` command (``torchrun --nproc-per-node N -m effops train ...``)."""

import sys

from .cli import main

sys.exit(main())
