"""Shared helpers of the example scripts (not part of the otfx package): real data that installs offline,
seeded parent training, fusion variants, results pages and plots. ``python examples/0N_*.py`` imports it as
``common``; outputs go where the scripts' arguments say (default: under the current directory)."""
