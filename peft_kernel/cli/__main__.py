"""``python -m peft_kernel.cli``: the same as the ``peft-kernel`` command."""

import sys

from . import main

sys.exit(main())
