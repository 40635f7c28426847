"""The training entry point (`python -m launcher.train --run-dir RUN_DIR`) and its helpers.

Importing this package is cheap: `launcher.train.data.validate_data` runs in the CLI process before
any training process starts, so nothing here imports torch at import time.
"""
