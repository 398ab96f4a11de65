"""Requests/s and latency of the raysys Serve endpoint under load: micro-batching on vs off.

A local Serve application (raysys.serve.build_app, proxy on 127.0.0.1 and a free port) receives
--requests POST /v1/predict requests, each a real DICOM file as the raw body, from --concurrency
client threads (one requests.Session each), in two phases on the same bodies in the same run:

  batched    build_app(checkpoint, ServeConfig(max_batch_size=--max-batch-size, batch_wait_ms=--batch-wait-ms))
  unbatched  build_app(checkpoint, ServeConfig(max_batch_size=1)): every request is its own forward pass

  hostile    the batched application again, with --hostile-fraction of the requests (every 10th at 0.1)
             replaced by bodies it must refuse (raysys.testing.hostile_bodies: a header cut short, garbage,
             an RLE bomb, a deflate bomb, 2 MiB without pixels): the good requests must see 0 errors, and
             their p99 stands beside the clean batched phase's; every hostile one must get a 4xx

The application is deleted and deployed again between phases. Each phase first sends --warmup
requests (not counted), then stops at --requests or after --max-seconds, whichever comes first.
Reported per phase: requests/s (successful answers / seconds until the last answer), p50/p95/p99
latency in ms of the successful requests, and errors (non-200 answers and failed connections).
The two phases must score the warm-up bodies alike (probabilities_max_abs_diff).

Without --checkpoint an untrained InceptionV3 is saved at --image-size, default 128 px so that
CPU inference stays quick (speed does not depend on the weights); without --data a small
512 x 512 phantom is written. One replica with --cpus-per-replica CPUs (default 1; as many torch threads) serves;
the load generator runs on the same machine and competes with it for CPUs.

    .venv/bin/python benchmarks/serve_load.py [--data DIR] [--checkpoint DIR] [--image-size 128]
        [--requests 1000] [--concurrency 16] [--max-batch-size 16] [--max-seconds 300]
        [--num-cpus N | --address ADDR] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import requests
from _common import add_ray_flags, emit, init_ray, input_data, log, machine, untrained_checkpoint
from ray import serve

from raysys.config import ServeConfig
from raysys.model import read_meta
from raysys.serve import TOKEN_ENV, build_app
from raysys.testing import free_port, hostile_bodies, small_phantom, wait_healthy

APP = "raysys-bench"
HEADERS = {"Content-Type": "application/dicom"}
if os.environ.get(TOKEN_ENV):  # the replicas inherit the token and will ask for it
    HEADERS["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"


def load(url: str, bodies: list[bytes], n: int, concurrency: int, max_seconds: float,
         hostile: list[bytes] = (), hostile_fraction: float = 0.0) -> dict:
    """Send n requests (body i % len(bodies)) from `concurrency` threads; stop early at max_seconds.

    With hostile bodies, request i is hostile when floor((i + 1) f) > floor(i f), f = hostile_fraction;
    stats cover the good requests, and `hostile` counts the hostile ones' answers by status."""
    counter, lock = itertools.count(), threading.Lock()
    latencies, errors, answered, refused = [], [], [], Counter()
    start = time.perf_counter()
    deadline = start + max_seconds

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter)
                if i >= n or time.perf_counter() > deadline:
                    return
                bad = bool(hostile) and int((i + 1) * hostile_fraction) > int(i * hostile_fraction)
                body = hostile[i % len(hostile)] if bad else bodies[i % len(bodies)]
                sent = time.perf_counter()
                try:
                    reply = session.post(f"{url}/v1/predict", data=body, headers=HEADERS, timeout=60)
                    status, error = reply.status_code, None if reply.status_code == 200 else \
                        f"HTTP {reply.status_code}: {reply.text[:200]}"
                except requests.RequestException as e:
                    status, error = type(e).__name__, f"{type(e).__name__}: {e}"
                done = time.perf_counter()
                with lock:
                    answered.append(done)
                    if bad:
                        refused[str(status)] += 1
                    elif error is None:
                        latencies.append(done - sent)
                    else:
                        errors.append(error)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()  # a bug in the client must not pass for a quiet phase
    seconds = (max(answered) if answered else time.perf_counter()) - start
    ms = np.array(latencies) * 1000
    pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)}
    if errors:
        log(f"  {len(errors)} errors, first: {errors[0][:200]}")
    stats = {"rps": round(len(latencies) / seconds, 2), **pct, "errors": len(errors), "requests": len(answered),
             "seconds": round(seconds, 2)}
    if hostile:
        stats["hostile"] = dict(sorted(refused.items()))
        stats["hostile_not_4xx"] = sum(k for status, k in refused.items() if not status.startswith("4"))
    return stats


def warm_up(url: str, bodies: list[bytes], n: int) -> dict[str, np.ndarray]:
    """n sequential requests, not counted; returns the probabilities per image id for the cross-phase check."""
    seen = {}
    with requests.Session() as session:
        for i in range(n):
            reply = session.post(f"{url}/v1/predict", data=bodies[i % len(bodies)], headers=HEADERS, timeout=120)
            if reply.status_code != 200:
                raise RuntimeError(f"warm-up request {i}: HTTP {reply.status_code}: {reply.text[:300]}")
            answer = reply.json()
            seen[answer["image_id"]] = np.array(list(answer["probabilities"].values()))
    return seen


def phase(name: str, app, url: str, bodies: list[bytes], args, hostile: list[bytes] = ()) -> tuple[dict, dict]:
    """Deploy `app`, wait until healthy, warm up, run the load, delete the app."""
    serve.run(app, name=APP, route_prefix="/")
    try:
        wait_healthy(url)
        seen = warm_up(url, bodies, args.warmup)
        stats = load(url, bodies, args.requests, args.concurrency, args.max_seconds, hostile, args.hostile_fraction)
        counts = requests.get(f"{url}/v1/model", headers=HEADERS, timeout=30).json()["batching"]
        stats["mean_batch_size"] = round(counts["images"] / max(counts["batches"], 1), 2)  # warm-up included
    finally:
        serve.delete(APP)
    log(f"{name:10s} {stats}")
    return stats, seen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of .dcm files sent as bodies (default: a generated phantom)")
    parser.add_argument("--studies", type=int, default=2, help="phantom studies when --data is omitted")
    parser.add_argument("--files", type=int, default=64, help="at most this many distinct bodies, loaded in memory")
    parser.add_argument("--checkpoint", type=Path, help="raysys checkpoint (default: an untrained one at --image-size)")
    parser.add_argument("--image-size", type=int, default=128, help="size of the generated checkpoint")
    parser.add_argument("--requests", type=int, default=1000, help="counted requests per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads, one request in flight each")
    parser.add_argument("--max-batch-size", type=int, default=16, help="Serve micro-batch size of the batched phase")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="Serve batch wait of the batched phase")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (torch threads) of the one replica")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests before each phase")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long per phase")
    parser.add_argument("--hostile-fraction", type=float, default=0.1,
                        help="share of hostile bodies in the hostile phase (0: no such phase)")
    add_ray_flags(parser, "join this Ray cluster (its head must be this machine: HTTP is local)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="raysys-bench-") as tmp:
        tmp = Path(tmp)
        data, _ = input_data(args.data, args.studies, tmp)
        checkpoint = args.checkpoint or untrained_checkpoint(tmp / "checkpoint", args.image_size)
        image_size = read_meta(checkpoint)["image_size"]
        bodies = [p.read_bytes() for p in sorted(data.rglob("*.dcm"))[: args.files]]
        log(f"{len(bodies)} bodies of {np.mean([len(b) for b in bodies]) / 1024:.0f} KiB on average; "
            f"image size {image_size}; {args.requests} requests at concurrency {args.concurrency}")

        cores = init_ray(args.address, args.num_cpus)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            batched_cfg = ServeConfig(cpus_per_replica=args.cpus_per_replica, max_batch_size=args.max_batch_size,
                                      batch_wait_ms=args.batch_wait_ms)
            batched, seen_b = phase("batched", build_app(str(checkpoint), batched_cfg), url, bodies, args)
            unbatched, seen_u = phase("unbatched", build_app(str(checkpoint), replace(batched_cfg, max_batch_size=1)),
                                      url, bodies, args)
            small_phantom(tmp / "hostile", studies=1, size=512)  # hostile_bodies starts from an explicit-VR slice
            kinds = hostile_bodies(next((tmp / "hostile" / "dicoms").glob("*.dcm")).read_bytes())
            hostile = phase("hostile", build_app(str(checkpoint), batched_cfg), url, bodies, args,
                            list(kinds.values()))[0] if args.hostile_fraction > 0 else None
        finally:
            serve.shutdown()
            ray.shutdown()

    diff = max((float(np.abs(seen_b[i] - seen_u[i]).max()) for i in seen_b.keys() & seen_u.keys()), default=None)
    result = {
        "batched": batched,
        "unbatched": unbatched,
        "batching_speedup": round(batched["rps"] / unbatched["rps"], 2),
        "hostile": hostile,
        "hostile_fraction": args.hostile_fraction,
        "hostile_kinds": list(kinds),
        "p99_ms_clean_vs_hostile": [batched["p99_ms"], hostile["p99_ms"] if hostile else None],
        "concurrency": args.concurrency,
        "image_size": image_size,
        "max_batch_size": args.max_batch_size,
        "cpus_per_replica": args.cpus_per_replica,
        "batch_wait_ms": args.batch_wait_ms,
        "warmup_requests": args.warmup,
        "max_seconds": args.max_seconds,
        "probabilities_max_abs_diff": diff,
        "bodies": len(bodies),
        "cores": cores,
        "checkpoint": str(args.checkpoint) if args.checkpoint else f"untrained InceptionV3 at {image_size} px",
        "data": str(args.data) if args.data else f"phantom(studies={args.studies}, size=512, seed=0)",
        **machine(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
