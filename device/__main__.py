"""``python -m device run --config device.toml``: the agent without the ``fleetbus`` CLI around it."""

import sys

from device.entry import main

sys.exit(main())
