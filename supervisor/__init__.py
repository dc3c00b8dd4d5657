"""Tinytown's engine: config, Redis schema, the supervisor, its runners and their model CLIs.

Submodules are imported on demand so that a short `tt` command pays only for what it uses.
"""
