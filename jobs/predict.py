"""`ray job submit --working-dir . -- python jobs/predict.py --checkpoint DIR --data URI --out submission.csv ...`."""

import sys

from _common import ROOT  # noqa: F401  (puts the package on sys.path)

from raysys.cli import main

main(["predict", "--address", "auto", *sys.argv[1:]])
