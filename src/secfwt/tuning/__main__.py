"""``python -m secfwt.tuning``: plaintext tuning runner (see :mod:`secfwt.tuning.run`)."""

import sys

from secfwt.tuning.run import main

sys.exit(main())
