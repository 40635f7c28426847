"""`python -m launcher.train --run-dir RUN_DIR [--resume-from CHECKPOINT]` (see launcher/train/run.py)."""

import sys

from launcher.train.run import main

if __name__ == "__main__":
    sys.exit(main())
