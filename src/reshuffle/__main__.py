"""``python -m reshuffle ...`` (what ``torchrun -m reshuffle run ...`` executes)."""

import sys

from reshuffle.cli import main

sys.exit(main())
