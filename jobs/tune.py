"""`ray job submit --working-dir . -- python jobs/tune.py [raysys tune flags] [--smoke-test]`."""

import sys

from _common import smoke_data, smoke_name, without

from raysys.cli import main

argv, smoke = without(sys.argv[1:], "--smoke-test")
if smoke:
    dicoms, labels = smoke_data(argv)
    argv = ["--data", dicoms, "--labels", labels, "--image-size", "80", "--num-samples", "2", "--max-epochs", "2",
            "--batch-size", "4", "--weights", "none", "--max-steps-per-epoch", "2", "--workers-per-trial", "1",
            "--name", smoke_name(), *argv]
main(["tune", "--address", "auto", *argv])
