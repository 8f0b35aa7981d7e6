import sys

from secfwt.cli import main

sys.exit(main())
