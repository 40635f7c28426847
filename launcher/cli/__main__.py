"""`python -m launcher.cli ...`: the same as `ftl ...`."""

from launcher.cli.commands import main

main()
