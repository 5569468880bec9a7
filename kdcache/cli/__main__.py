"""``python -m kdcache.cli``: the ``kdcache`` command."""

import sys

from kdcache.cli.app import main

sys.exit(main())
