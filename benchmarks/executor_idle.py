"""What raysys' IdleWait callback is worth: the demo's Tune stage with Ray Data's scheduling loop as Ray ships it and
with raysys.executor_idle.IdleWait, one after the other in one run, each on a fresh local Ray.

Ray Data's scheduling loop spins while a pipeline waits for a slower trainer (a task with output it may not take
yet counts as ready, so `ray.wait` returns at once); on a small machine that core is the trainers'. Both variants
run the same sweep: phantom studies written here, the demo's recipe (InceptionV3 at 96 px from scratch, batch 16,
one 0.5-CPU worker per trial, two concurrent trials, the same learning-rate draws) for --epochs epochs, with ASHA's
grace period as long as the sweep so both trials run every epoch. Reported per variant: the sweep's wall time, each
epoch's seconds and per-worker img/s (mean over the trials, epochs >= 2 separately), the seconds the trainers
waited for data, and the CPU seconds Ray's split coordinator processes used (read from /proc every 0.5 s).

    .venv/bin/python benchmarks/executor_idle.py [--studies 40] [--epochs 3] [--num-cpus 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import emit, log, machine

VARIANTS = ("ray", "raysys")  # Ray Data as shipped; with IdleWait registered (raysys' default)


class CoordinatorCPU:
    """CPU seconds of every `ray::SplitCoordinator` process seen, sampled from /proc in a thread."""

    def __init__(self, every_s: float = 0.5):
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(every_s):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::SplitCoordinator"):
                        continue
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                self.seen[int(pid)] = (int(fields[11]) + int(fields[12])) / tick

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())


def one_variant(variant: str, data: Path, workdir: Path, epochs: int, num_cpus: int) -> dict:
    """Run the sweep in this process on a fresh local Ray (`variant` decides whether IdleWait is registered)."""
    from raysys.runtime import CALLBACKS_ENV, init_ray

    env = {} if variant == "raysys" else {"env_vars": {CALLBACKS_ENV: ""}}  # workers: no callback for "ray"
    init_ray("local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env)  # before Ray Data is imported
    if variant == "ray":
        os.environ[CALLBACKS_ENV] = ""  # and none for this driver's own executions
    import pandas as pd
    import ray

    from raysys.config import Config
    from raysys.tune import sweep
    cfg = Config().replace(**{
        "data.data": str(data / "dicoms"), "data.labels": str(data / "labels.csv"), "data.image_size": 96,
        "data.val_fraction": 0.2, "model.weights": "none", "train.batch_size": 16, "train.workers": 1,
        "train.cpus_per_worker": 0.5, "sweep.storage_path": str(workdir), "sweep.name": variant,
        "sweep.num_samples": 2, "sweep.max_epochs": epochs, "sweep.grace_period": epochs,
        "sweep.lr_min": 1e-3, "sweep.lr_max": 3e-3, "sweep.decay_min": 0.8, "sweep.decay_max": 1.0,
    })
    began = time.perf_counter()
    with CoordinatorCPU() as coordinators:
        result = sweep(cfg)
    wall = time.perf_counter() - began
    frames = [pd.read_csv(Path(result.sweep_dir) / "trials" / trial / "metrics.csv") for trial in result.trials["trial"]]
    epochs_frame = pd.concat(frames).groupby("epoch").mean(numeric_only=True)
    later = epochs_frame[epochs_frame.index >= 2]
    ray.shutdown()
    return {
        "variant": variant,
        "sweep_s": round(wall, 1),
        "epoch_s": [round(x, 1) for x in epochs_frame["epoch_seconds"]],
        "images_per_s_per_worker": [round(x, 2) for x in epochs_frame["train_images_per_s"]],
        "images_per_s_per_worker_epochs_2_on": round(float(later["train_images_per_s"].mean()), 2),
        "data_wait_s": [round(x, 1) for x in epochs_frame["data_wait_seconds"]],
        "split_coordinator_cpu_s": round(coordinators.seconds, 1),
        "split_coordinators": len(coordinators.seen),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40, help="phantom training studies (~18 slices each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of each variant's local Ray (the demo's: 2)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.data, args.workdir, args.epochs, args.num_cpus)), flush=True)
        return

    from raysys.demo import PREVALENCE_SCALE
    from raysys.synthetic import RSNA_PREVALENCE, PhantomConfig, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data, prevalence = Path(tmp) / "data", {k: p * PREVALENCE_SCALE for k, p in RSNA_PREVALENCE.items()}
        frame = write_dataset(data, PhantomConfig(studies=args.studies, size=256, seed=1, prevalence=prevalence))
        log(f"wrote {len(frame)} phantom slices in {args.studies} studies")
        runs = []
        for variant in VARIANTS:
            log(f"== {variant}: {args.epochs} epochs x 2 concurrent trials")
            child = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--data", str(data), "--workdir", tmp,
                 "--epochs", str(args.epochs), "--num-cpus", str(args.num_cpus)],
                stdout=subprocess.PIPE, text=True, check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            log(json.dumps(runs[-1]))
    ray_run, ours = runs
    emit({"benchmark": "executor_idle", "machine": machine(), "num_cpus": args.num_cpus, "studies": args.studies,
          "slices": len(frame), "epochs": args.epochs, "runs": runs,
          "speedup_sweep": round(ray_run["sweep_s"] / ours["sweep_s"], 2),
          "speedup_images_per_s_epochs_2_on": round(
              ours["images_per_s_per_worker_epochs_2_on"] / ray_run["images_per_s_per_worker_epochs_2_on"], 2)},
         args.out)


if __name__ == "__main__":
    main()
