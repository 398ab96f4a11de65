"""`ray job submit --working-dir . -- python jobs/prepare.py --data URI --labels CSV --out CACHE`."""

import sys

from _common import ROOT  # noqa: F401  (puts the package on sys.path)

from raysys.cli import main

main(["prepare", "--address", "auto", *sys.argv[1:]])
