"""``python -m collafuse.client``: the same as ``collafuse-client``."""

import sys

from collafuse.client.cli import main

sys.exit(main())
