"""Evaluate a run's best checkpoint on fixed test tasks: see `python test.py --help`; the command
is sparse_maml/cli/test.py."""

import sys

from sparse_maml.cli.test import cli

if __name__ == "__main__":
    sys.exit(cli())
