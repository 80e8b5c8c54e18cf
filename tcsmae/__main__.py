import sys

from tcsmae.cli import main

sys.exit(main())
