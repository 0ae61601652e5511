import sys

from mixofshow.cli import main

sys.exit(main())
