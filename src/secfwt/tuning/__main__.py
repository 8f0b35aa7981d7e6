"""``python -m secfwt.tuning ...`` = ``secfwt tune --mode plaintext ...`` (one entry point for every mode)."""

import sys

from secfwt.cli import main

sys.exit(main(["tune", "--mode", "plaintext", *sys.argv[1:]]))
