"""`ray job submit --working-dir . -- python jobs/train.py [raysys train flags] [--smoke-test]`."""

import sys

from _common import smoke_data, smoke_name, without

from raysys.cli import main

argv, smoke = without(sys.argv[1:], "--smoke-test")
if smoke:  # a minute-long end-to-end check of the cluster: synthetic data, tiny model input, 2 epochs
    dicoms, labels = smoke_data(argv)
    argv = ["--data", dicoms, "--labels", labels, "--image-size", "80", "--epochs", "2", "--batch-size", "4",
            "--weights", "none", "--max-steps-per-epoch", "3", "--name", smoke_name(), *argv]
main(["train", "--address", "auto", *argv])
