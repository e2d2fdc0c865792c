"""Command-line entry points behind scripts/*.sh (run as `python -m emu3.cli.<name>`)."""
