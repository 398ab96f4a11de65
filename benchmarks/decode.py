"""Images/s per core: raysys decode+window vs the straightforward pydicom baseline vs a cost floor.

Three paths, each from a file path to a (3, size, size) image, file read included, on the
same files in the same run, interleaved in rounds and pinned to one core:

  raysys    raysys.dicom.decode -> raysys.windowing.window_pixels (resize first, uint8 out)
  baseline  pydicom.dcmread -> pixel_array -> float64 HU (apply_modality_lut, RSNA
            wrapped-intercept fix) -> per window: clip, scale to [0, 1], cv2.resize -> uint8
  floor     read the bytes, view the trailing rows*cols 16-bit pixels, one INTER_AREA resize

Before timing, every file is checked: raysys HU must equal pydicom's HU exactly, and the
raysys and baseline windows are compared in uint8 steps (informational: they resize in a
different order with a different interpolation). Prints one JSON line to stdout.

    .venv/bin/python benchmarks/decode.py --data /work/shared/rsna-sample [--size 256]
        [--seconds 3] [--repeat 1] [--out result.json]
"""

import os

# One core, no hidden thread pools: set before numpy/cv2 are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402

from raysys.dicom import DicomDecodeError, decode, read_dicom  # noqa: E402
from raysys.storage import to_json  # noqa: E402
from raysys.windowing import DEFAULT_WINDOWS, window_pixels  # noqa: E402

BASELINE_WINDOWS = ((40, 80), (80, 200), (40, 380))  # (center, width): brain, subdural, soft tissue
NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # the floor reads raw pixel bytes
SLICE_S = 0.2  # each path runs whole passes for about this long per round, then the next path runs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raysys_image(path: Path, size: int) -> np.ndarray:
    s = decode(path)
    return window_pixels(s.pixels, s.slope, s.intercept, DEFAULT_WINDOWS, size, np.uint8)


def baseline_hu(path: Path) -> np.ndarray:
    """HU (H, W) float64 the way a user writes it with pydicom, RSNA defect repaired."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if ds.get("BitsStored") == 12 and ds.get("PixelRepresentation") == 0 and float(ds.RescaleIntercept) > -100:
        arr = arr.astype(np.int32) + 1000
        arr[arr >= 4096] -= 4096
        ds.RescaleIntercept = -1000
    return apply_modality_lut(arr, ds).astype(np.float64)


def baseline_windows(hu: np.ndarray, size: int) -> np.ndarray:
    channels = []
    for center, width in BASELINE_WINDOWS:
        low = center - width / 2
        img = (np.clip(hu, low, low + width) - low) / width
        channels.append(cv2.resize(img, (size, size)))
    return (np.stack(channels) * 255).astype(np.uint8)  # (3, size, size)


def baseline_image(path: Path, size: int) -> np.ndarray:
    return baseline_windows(baseline_hu(path), size)


def floor_image(path: Path, size: int, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
    b = path.read_bytes()
    px = np.frombuffer(b, dtype, count=rows * cols, offset=len(b) - rows * cols * 2).reshape(rows, cols)
    return cv2.resize(px, (size, size), interpolation=cv2.INTER_AREA)


def check(files: list[Path], size: int) -> tuple[list[tuple[Path, int, int, np.dtype]], dict]:
    """Validate every file; return the usable ones (with floor geometry) and the check results."""
    good, errors, identical, diffs = [], [], 0, []
    for path in files:
        try:
            hu, meta = read_dicom(path)
        except DicomDecodeError as e:
            errors.append({"file": str(path), "reason": str(e)})
            continue
        try:
            ref = baseline_hu(path)
        except Exception as e:  # the baseline must run on every file we time
            errors.append({"file": str(path), "reason": f"baseline (pydicom): {type(e).__name__}: {e}"})
            continue
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if header.file_meta.get("TransferSyntaxUID") not in NATIVE_LE or header.get("BitsAllocated") != 16:
            errors.append({"file": str(path), "reason": "floor path needs uncompressed 16-bit pixels"})
            continue
        identical += bool(np.array_equal(hu, ref.astype(np.float32)))
        diff = np.abs(raysys_image(path, size).astype(np.int16) - baseline_windows(ref, size).astype(np.int16))
        diffs.append((int(diff.max()), float(diff.mean())))
        dtype = np.dtype("<i2" if header.get("PixelRepresentation") == 1 else "<u2")
        good.append((path, meta.rows, meta.columns, dtype))
    result = {
        "hu_identical_to_pydicom": bool(good) and identical == len(good),
        "hu_identical_files": identical,
        "max_abs_diff_u8": max((d[0] for d in diffs), default=None),
        "mean_abs_diff_u8": round(float(np.mean([d[1] for d in diffs])), 4) if diffs else None,
        "errors": errors,
    }
    return good, result


def time_paths(paths: dict, n_files: int, seconds: float, repeat: int) -> dict[str, float]:
    """Images/s per path: rounds rotate the path order; each path gets >= seconds and >= repeat passes."""
    spent = {name: 0.0 for name in paths}
    passes = {name: 0 for name in paths}
    names, rnd = list(paths), 0
    while any(spent[n] < seconds or passes[n] < repeat for n in names):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            if spent[name] >= seconds and passes[name] >= repeat:
                continue
            run, start = paths[name], time.perf_counter()
            while True:
                run()
                passes[name] += 1
                if time.perf_counter() - start >= SLICE_S:
                    break
            spent[name] += time.perf_counter() - start
        rnd += 1
    for name in names:
        rate = passes[name] * n_files / spent[name]
        log(f"{name:9s} {passes[name]:5d} passes  {spent[name]:6.2f} s  {rate:9.1f} img/s")
    return {name: passes[name] * n_files / spent[name] for name in names}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="directory searched recursively for *.dcm")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per path")
    parser.add_argument("--repeat", type=int, default=1, help="minimum passes over all files per path")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    assert BASELINE_WINDOWS == tuple((w.center, w.width) for w in DEFAULT_WINDOWS), "baseline windows drifted"

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    cv2.setNumThreads(1)

    files = sorted(args.data.rglob("*.dcm"))
    if not files:
        raise SystemExit(f"no *.dcm files under {args.data}")
    log(f"checking {len(files)} files under {args.data} (pinned to cpu {cpu})")
    good, checked = check(files, args.size)
    log(f"{len(good)} usable, {len(checked['errors'])} excluded; HU identical to pydicom on "
        f"{checked['hu_identical_files']}/{len(good)}; max |raysys - baseline| = {checked['max_abs_diff_u8']} u8 steps")
    if not good:
        raise SystemExit("no usable files")

    size = args.size
    paths = {
        "raysys": lambda: [raysys_image(p, size) for p, *_ in good],
        "baseline": lambda: [baseline_image(p, size) for p, *_ in good],
        "floor": lambda: [floor_image(p, size, r, c, dt) for p, r, c, dt in good],
    }
    for p, r, c, dt in good[:1]:  # warm-up: imports, cv2 kernels, scratch buffers
        raysys_image(p, size), baseline_image(p, size), floor_image(p, size, r, c, dt)
    ips = time_paths(paths, len(good), args.seconds, args.repeat)

    result = {
        "raysys_ips": round(ips["raysys"], 1),
        "baseline_ips": round(ips["baseline"], 1),
        "floor_ips": round(ips["floor"], 1),
        "speedup": round(ips["raysys"] / ips["baseline"], 2),
        "raysys_cost_vs_floor": round(ips["floor"] / ips["raysys"], 2),
        "files": len(good),
        "size": size,
        "includes_file_read": True,
        "cores_used": 1,
        "cpu_pinned": cpu,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "opencv": cv2.__version__,
        "seconds_per_path": args.seconds,
        **checked,
        "data": str(args.data),
    }
    line = to_json(result, indent=None)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
