"""The `omnistream` command line: one entry point, subcommands in `omnistream_cli.commands`."""
