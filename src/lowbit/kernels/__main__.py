"""python -m lowbit.kernels: build lowbit's native CPU kernels (see lowbit.kernels.native)."""

import sys

from .native import main

sys.exit(main())
