"""The `triton-disagg` command: one subcommand per module-level function in `cli.main`."""
