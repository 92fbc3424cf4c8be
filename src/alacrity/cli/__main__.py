import sys

from alacrity.cli.main import main

sys.exit(main())
