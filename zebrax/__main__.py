import sys

from zebrax.cli import main

sys.exit(main())
