"""`python -m launcher.agent --run-dir RUN_DIR [--machine-rank R --nodes N --main-addr A --port P]`."""

import sys

from launcher.agent.node import main

sys.exit(main())
