"""Meta-train Sparse-MAML (or a MAML-family baseline) and test the best
checkpoint: see `python train.py --help`; the command is sparse_maml/cli/train.py."""

import sys

from sparse_maml.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())
