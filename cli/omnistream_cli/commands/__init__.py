"""Subcommand groups of `omnistream`; each module defines register(subparsers)."""
