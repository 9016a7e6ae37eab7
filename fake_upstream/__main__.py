import sys

from fake_upstream.cli import main

sys.exit(main())
