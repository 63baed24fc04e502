"""The `omnistream` command line: one entry point, subcommands in `omnistream_cli.commands`."""

import omnistream_perception  # noqa: F401  (applies the stack's CPU threading policy before torch loads)
