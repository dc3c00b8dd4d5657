"""The `tt` command line: parse, call `supervisor`, print. Nothing here talks to processes directly."""
