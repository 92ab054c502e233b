import sys

from kvcompress.entrypoints.cli.main import main

sys.exit(main())
