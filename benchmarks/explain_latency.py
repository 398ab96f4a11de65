"""Latency of one slice through POST /v1/explain beside POST /v1/predict on the same Serve replica.

A local Serve application (raysys.serve.build_app, proxy on 127.0.0.1 and a free port) receives --requests
rounds of sequential requests, one phantom DICOM slice (512 x 512) as the raw body: /v1/predict, /v1/explain
(all six heat maps) and /v1/explain?labels=any (one map: what the viewer asks for), in turn, so that all see
the same machine state. --warmup rounds go first, not counted. Reported per request kind: median and p90
latency in ms as the client sees it (the whole HTTP round trip, answer read and parsed) and as the replica
reports it (latency_ms), the answer's size; then each explain's median and p90 over predict's. The goal on
CPU: explain within GOAL_RATIO times predict's latency.
The heat maps' layer and method are the service's own (raysys.explain's defaults), read from the answer.

After Serve is shut down, `model_ms` breaks the cost down in this process, torch on the replica's threads:
CPU milliseconds (the least of --repeats, so that other load on the machine counts little) of infer()
and of explain() for each (layer, method) of raysys.explain.VARIANTS on the same preprocessed slice, and of encoding
its 9 PNGs (6 heat maps, 3 windows) as the service does.

Without --checkpoint an untrained InceptionV3 is saved at --image-size (speed does not depend on the
weights). One replica with --cpus-per-replica CPUs (as many torch threads) serves; the client runs on the
same machine.

    .venv/bin/python benchmarks/explain_latency.py [--checkpoint DIR] [--image-size 256] [--requests 30]
        [--warmup 3] [--repeats 5] [--cpus-per-replica 1] [--num-cpus N | --address ADDR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import requests
from _common import add_ray_flags, emit, init_ray, log, machine, untrained_checkpoint
from ray import serve

from raysys.config import ServeConfig
from raysys.labels import LABELS
from raysys.model import read_meta
from raysys.serve import TOKEN_ENV, build_app
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import free_port, wait_healthy

APP = "raysys-explain-bench"
KINDS = {"predict": "predict", "explain": "explain", "explain_one": "explain?labels=any"}  # kind -> request path
GOAL_RATIO = 2.0  # the goal: a single slice's explain within twice predict's latency, on CPU
MAX_REQUESTS = 500  # rounds: sequential requests, so more only takes longer
HEADERS = {"Content-Type": "application/dicom"}
if os.environ.get(TOKEN_ENV):  # the replica inherits the token and will ask for it
    HEADERS["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"


def send(session: requests.Session, url: str, path: str, body: bytes) -> tuple[float, dict, int]:
    """(client seconds, answer, answer bytes) of one request to /v1/<path>; any other status than 200 is an error."""
    sent = time.perf_counter()
    reply = session.post(f"{url}/v1/{path}", data=body, headers=HEADERS, timeout=120)
    answer = reply.json()
    seconds = time.perf_counter() - sent
    if reply.status_code != 200:
        raise RuntimeError(f"/v1/{path}: HTTP {reply.status_code}: {reply.text[:300]}")
    return seconds, answer, len(reply.content)


def stats(client_s: list[float], server_ms: list[float]) -> dict:
    ms = np.array(client_s) * 1000
    return {"median_ms": round(float(np.median(ms)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "min_ms": round(float(ms.min()), 1), "server_median_ms": round(float(np.median(server_ms)), 1)}


def measure(url: str, body: bytes, rounds: int, warmup: int) -> dict:
    """Each request kind in turn, `rounds` times after `warmup` uncounted rounds."""
    client = {k: [] for k in KINDS}
    server = {k: [] for k in KINDS}
    answers, sizes = {}, {}
    with requests.Session() as session:
        for i in range(warmup + rounds):
            for kind, path in KINDS.items():
                seconds, answers[kind], sizes[kind] = send(session, url, path, body)
                if i >= warmup:
                    client[kind].append(seconds)
                    server[kind].append(answers[kind]["latency_ms"])
    out = {k: {**stats(client[k], server[k]), "answer_bytes": sizes[k]} for k in KINDS}
    predicted, *explained = (np.array(list(answers[k]["probabilities"].values())) for k in KINDS)
    out["probabilities_max_abs_diff"] = float(max(np.abs(predicted - e).max() for e in explained))
    out["explain_method"] = answers["explain"]["explain"]
    return out


def model_ms(checkpoint: Path, body: bytes, threads: int, repeats: int) -> dict:
    """CPU ms (least of `repeats`) of infer, explain per layer and the PNGs of one slice, in this process."""
    import torch

    from raysys.engine import infer
    from raysys.explain import VARIANTS, explain, png
    from raysys.model import load_checkpoint
    from raysys.presets import dicom_to_image

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    loaded = load_checkpoint(checkpoint)
    image = dicom_to_image(body, loaded.meta["windows"], loaded.meta["image_size"])[0][None]

    def least(call) -> float:
        call()  # warm
        times = []
        for _ in range(repeats):
            start = time.process_time()
            call()
            times.append(time.process_time() - start)
        return round(min(times) * 1000, 1)

    maps = explain(loaded.model, image, cpu)[1][0]
    return {"infer": least(lambda: infer(loaded.model, image, cpu)),
            "explain": {f"{layer}/{method}": least(lambda layer=layer, method=method: explain(
                loaded.model, image, cpu, layer=layer, method=method)) for layer, method in VARIANTS},
            "explain_one_label": least(lambda: explain(loaded.model, image, cpu, labels=[LABELS.index("any")])),
            "png_9": least(lambda: [png(a) for a in [*maps, *image[0]]]), "threads": threads}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="raysys checkpoint (default: an untrained one at --image-size)")
    parser.add_argument("--image-size", type=int, default=256, help="size of the generated checkpoint")
    parser.add_argument("--requests", type=int, default=30, help=f"counted request rounds (1 to {MAX_REQUESTS})")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted request rounds first")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure of the in-process breakdown")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (torch threads) of the one replica")
    add_ray_flags(parser, "join this Ray cluster (its head must be this machine: HTTP is local)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be in [1, {MAX_REQUESTS}], got {args.requests}")

    with tempfile.TemporaryDirectory(prefix="raysys-explain-bench-") as tmp:
        tmp = Path(tmp)
        frame = write_dataset(tmp / "phantom", PhantomConfig(studies=1, slices_per_study=2, size=512, seed=0))
        body = Path(frame["path"].iloc[0]).read_bytes()
        checkpoint = args.checkpoint or untrained_checkpoint(tmp / "checkpoint", args.image_size)
        image_size = read_meta(checkpoint)["image_size"]
        log(f"one 512 x 512 phantom slice ({len(body) / 1024:.0f} KiB); image size {image_size}; "
            f"{args.requests} request rounds after {args.warmup} warm-up rounds")

        cores = init_ray(args.address, args.num_cpus)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(str(checkpoint), ServeConfig(cpus_per_replica=args.cpus_per_replica)), name=APP,
                      route_prefix="/")
            wait_healthy(url)
            measured = measure(url, body, args.requests, args.warmup)
        finally:
            serve.shutdown()
            ray.shutdown()
        breakdown = model_ms(checkpoint, body, max(1, round(args.cpus_per_replica)), args.repeats)

    ratio = {k: measured[k]["median_ms"] / measured["predict"]["median_ms"] for k in ("explain", "explain_one")}
    result = {
        **measured,
        "median_ratio": round(ratio["explain"], 2),
        "p90_ratio": round(measured["explain"]["p90_ms"] / measured["predict"]["p90_ms"], 2),
        "one_label_median_ratio": round(ratio["explain_one"], 2),
        "one_label_p90_ratio": round(measured["explain_one"]["p90_ms"] / measured["predict"]["p90_ms"], 2),
        "goal_ratio": GOAL_RATIO,
        "model_ms": breakdown,
        "within_goal": ratio["explain"] <= GOAL_RATIO,
        "one_label_within_goal": ratio["explain_one"] <= GOAL_RATIO,
        "requests": args.requests,
        "warmup_requests": args.warmup,
        "image_size": image_size,
        "cpus_per_replica": args.cpus_per_replica,
        "cores": cores,
        "checkpoint": str(args.checkpoint) if args.checkpoint else f"untrained InceptionV3 at {image_size} px",
        "data": "phantom(studies=1, size=512, seed=0), first slice",
        **machine(),
    }
    log(f"median: predict {measured['predict']['median_ms']} ms, explain {measured['explain']['median_ms']} ms "
        f"(x{result['median_ratio']}), explain?labels=any {measured['explain_one']['median_ms']} ms "
        f"(x{result['one_label_median_ratio']})")
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
