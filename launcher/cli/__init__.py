"""`ftl`, the command line: commands (parse, call the library) in commands.py, what they show in views.py."""

from launcher.cli.commands import app, main

__all__ = ["app", "main"]
