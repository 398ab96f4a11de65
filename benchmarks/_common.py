"""Helpers shared by the benchmark scripts: machine description, input data, an untrained checkpoint, output.

Imports neither ray nor torch at module level, so train_throughput.py still runs where Ray
is not installed. Scripts import it as `_common` (their own folder is first on sys.path).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from raysys.storage import to_json


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def local_cores() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity)."""
    return len(os.sched_getaffinity(0))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)  # no import: asking for ray's version must not need ray
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What the numbers were measured on; cores is this machine's, a Ray cluster's count goes elsewhere."""
    return {
        "cpu": cpu_model(),
        "machine_cores": local_cores(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
    }


def input_data(data: Path | None, studies: int, tmp: Path) -> tuple[Path, Path | None]:
    """(folder of .dcm files, labels CSV or None): `data` as given, else a fresh 512 px phantom under `tmp`."""
    if data is not None:
        if not any(data.rglob("*.dcm")):
            raise SystemExit(f"no *.dcm files under {data}")
        return data, None
    from raysys.synthetic import PhantomConfig, write_dataset

    frame = write_dataset(tmp / "phantom", PhantomConfig(studies=studies, size=512, seed=0))
    log(f"wrote a phantom dataset: {len(frame)} slices of 512 x 512 in {studies} studies under {tmp / 'phantom'}")
    return tmp / "phantom" / "dicoms", tmp / "phantom" / "labels.csv"


def untrained_checkpoint(directory: Path, image_size: int) -> Path:
    """A randomly initialised InceptionV3 checkpoint at `image_size`: speed does not depend on the weights."""
    from raysys.config import Config
    from raysys.model import build_model, save_checkpoint

    model = build_model(image_size=image_size)
    config = Config().replace(**{"data.image_size": image_size}).to_dict()
    return save_checkpoint(directory, model, config=config, epoch=0, metrics={})


def add_ray_flags(parser, address_help: str = "join this Ray cluster instead of starting a local one") -> None:
    """--num-cpus / --address (see init_ray) and --out, the same in every Ray benchmark."""
    parser.add_argument("--num-cpus", type=int, default=local_cores(), help="CPUs of the local Ray (default: all)")
    parser.add_argument("--address", help=address_help)
    parser.add_argument("--out", type=Path, help="also write the JSON here")


def init_ray(address: str | None, num_cpus: int, dashboard: bool = False) -> int:
    """Start a private local Ray with `num_cpus` (never attach to another one by accident), or join `address`.

    Ray Train wants the dashboard (its state API cleans up a finished run's placement group): with `dashboard`
    Ray starts it where its packages (ray[default]) are installed, and runs without it where they are not (the
    GPU machines' bundle). Returns the cluster's CPU count.
    """
    import ray

    from raysys import runtime

    if address:
        runtime.init_ray(address)
    else:
        runtime.init_ray("local", num_cpus=num_cpus, include_dashboard=None if dashboard else False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines go to stderr
    return int(ray.cluster_resources().get("CPU", 0))


def emit(result: dict, out: Path | None) -> None:
    """The one JSON line on stdout (and in `out` when given): strict JSON, NaN and infinities as null."""
    line = to_json(result, indent=None)
    print(line, flush=True)
    if out:
        out.write_text(line + "\n")
