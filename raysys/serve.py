"""Ray Serve: an HTTP endpoint that scores CT slices with a checkpoint; build_app(checkpoint).

POST /v1/predict  DICOM as the raw body (Content-Type: application/dicom) or multipart file(s)
POST /v1/explain  the same bodies: predict's probabilities plus heat maps and the windowed input, as PNGs
GET  /v1/model    stage ("cnn" or "sequence"), labels, windows, image size and validation metrics of the checkpoint,
                  its 2.5D `neighbors` (0: none) and the request `limits` (max_body_bytes, max_files)
GET  /healthz     200 once the model is loaded
GET  /            the viewer (raysys/viewer/index.html); GET /viewer/NAME its other files (no token: the page
                  asks for the token and sends it with its API calls)

Two deployments: Gateway, the HTTP ingress (0 CPUs, on the head node), checks the bearer token where one is
configured (every /v1/ route and any request with a body need it) before it reads a byte of the body, reads each
body within max_body_bytes and relays the request to a HemorrhageService replica (the model, the batching, the
routes below), which answers it. When a replica is lost with requests in flight (its node crashed, its process
died), the Gateway sends each of them once more to another replica and, if that fails too, answers 503 JSON with
Retry-After, where Serve's proxy alone would answer a plain-text 500. An answer that took the second try carries
the header `X-Raysys-Retried: 1`.

Preprocessing is the checkpoint's own (windows, size, label order from meta.json,
through the same presets as training). Responses and logs carry the image id
(SOPInstanceUID) and a multipart part's position only, never PatientName, PatientID,
dates, SeriesInstanceUID or the client's file names (which often hold them).

A CNN checkpoint scores each slice alone: a raw body gets {image_id, probabilities, model,
latency_ms}, a multipart body {"results": [the same per part, in part order]}.

A sequence checkpoint (raysys.sequence) scores slices in their series' context. A multipart body
may hold whole series, several series, or single slices, parts in any order: each part's CNN
forward pass is batched across requests as for a CNN checkpoint, then the request's slices are
grouped by SeriesInstanceUID (a slice without one is a series of its own), ordered by position
along the series' axis (raysys.data.order_series, as in training and batch predict), and the
series GRU reads them. The answer is

    {"results": [{image_id, series, slice, probabilities, cnn_probabilities}, ...],
     "series": [{series, slices, max}, ...], "model": {..., "stage": "sequence"}, "latency_ms"}

results in slice order, series after series; `series` indexes the series list (numbered by the
request part each series first appears in), `slice` is the 0-based place in its series, `max` the
per-label maximum of `probabilities` over the series' slices, and cnn_probabilities the CNN's own
scores of the slice. A raw body is a series of one and gets today's single answer plus
cnn_probabilities. Only the slices of one request form a series: a series sent over several
requests is scored as several series. A SOPInstanceUID may appear once per request (400 otherwise).

A 2.5D checkpoint (meta.json `neighbors` n > 0) reads each slice between its n neighbours on each side:
they come from the same request's slices of its series, ordered as above; past a series' end, across a
gap, or for a slice without a place in its series (no position) the slice itself stands in, so a lone slice
is scored as itself repeated (raysys.data.neighbor_paths, as in training). As for a sequence
checkpoint, a SOPInstanceUID may appear once per request (400 naming it otherwise).

/v1/explain takes what /v1/predict takes (same limits, token and errors) and answers per slice

    {image_id, probabilities, heatmaps: {label: PNG}, windows: [{name, center, width, png: PNG}, ...],
     size: S, explain: {method, layer}}

PNG: a base64 8-bit grayscale PNG of S x S pixels, S the checkpoint's image size. heatmaps: where the CNN
found evidence for each label (raysys.explain.explain at its default layer and method, which the answer's
`explain` names; each map scaled to [0, 1] by its own peak, all zeros without positive evidence). windows:
the model input's channels, one per checkpoint window (a 2.5D checkpoint: the slice's own, the middle of its
stack). A raw body gets that object plus model and latency_ms; a multipart body {"results": [one per part,
in part order], "model", "latency_ms"}. The probabilities are predict's: for a CNN checkpoint they come from
the heat maps' forward pass, which is predict's computation (raysys.explain). For a sequence checkpoint the
answer is predict's sequence answer (slice order, series, slice, cnn_probabilities, the series list) with
heatmaps, windows, size and explain added to each slice; its heat maps explain the CNN's per-slice evidence
(cnn_probabilities), not the GRU's reading of the series. Heat maps need a backward pass per label: on CPU
an explained slice costs several forward passes (benchmarks/explain_latency.py), so `?labels=any,subdural`
(comma-separated label names) asks for those maps only (`heatmaps` then holds just them; the probabilities are
always all six): the viewer asks for the one it shows. Likewise `?parts=3` (1-based part numbers of a multipart
body, comma-separated) explains those parts only: every part is still read and is still the others' 2.5D
neighbour or series context, but `results` holds just the parts asked for (in part order, or slice order for a
sequence checkpoint) and only they cost a backward pass; the viewer sends a 2.5D checkpoint the whole series it
scored with the slice it shows named this way. A query parameter given twice (`?labels=any&labels=subdural`) is
a 400: write its values comma-separated.

Hostile input costs the sender, not the other clients: decoding runs in a thread pool
sized to the replica's CPUs, never on the event loop that answers /healthz, and bodies over
SMALL_BODY (larger than any real slice) have a lane of their own; bodies over
max_body_bytes are read to the end (up to DRAIN_FACTOR times the limit) so that any client
gets the 413 JSON rather than a reset connection; a multipart body holds at most max_files files.
"""


import asyncio
import base64
import hmac
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from raysys import storage
from raysys.config import ServeConfig, build_config

log = logging.getLogger("raysys.serve")

TOKEN_ENV = "RAYSYS_API_TOKEN"  # when set, requests need `Authorization: Bearer <token>`
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit before the 413
PARSE_CHUNK = 64 * 1024  # multipart bodies are parsed in pieces, yielding the event loop between them
GIL_SWITCH_S = 0.00025  # see __init__
SMALL_BODY = 4 * 1024 * 1024  # every real slice fits (1024 x 1024 x 16 bit is 2 MiB): it never queues behind a larger one
VIEWER_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                ".json": "application/json", ".ico": "image/x-icon"}  # the viewer files served; others are 404

api = FastAPI(title="raysys", description="Intracranial hemorrhage probabilities for head-CT DICOM slices")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _refused(endpoint: str, error: RequestError) -> JSONResponse:
    log.info("%s rejected: %s %s", endpoint, error.status, error.message)
    return JSONResponse({"error": error.message}, status_code=error.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes; a larger one is drained (up to DRAIN_FACTOR x the limit) and refused (413).

    Answering before the client has written its body makes many clients (Python's urllib among them)
    see a reset connection instead of the 413; a client that sent `Expect: 100-continue` is waiting
    for our word and is answered at once."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else None
    over = f"body of {size} bytes is over the {limit}-byte limit" if size is not None and size > limit else None
    if over and (request.headers.get("expect", "").lower() == "100-continue" or size > DRAIN_FACTOR * limit):
        raise RequestError(413, over)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if over is None and received > limit:
            over, chunks = f"body is over the {limit}-byte limit", []
        if over is None:
            chunks.append(chunk)
        elif received > DRAIN_FACTOR * limit:
            break  # stop reading: past this the client gets a closed connection, not our answer
    if over:
        raise RequestError(413, over)
    return b"".join(chunks)


def _b64_png(image: np.ndarray) -> str:
    """A (S, S) array (uint8, or floats in [0, 1]) as base64 text of an 8-bit grayscale PNG."""
    from raysys.explain import png

    return base64.b64encode(png(image)).decode("ascii")


async def _multipart_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    """File parts of a multipart body (already size-checked), in order; names are the client's and dropped.

    The body is replayed into Starlette's parser in PARSE_CHUNK pieces with a yield between them, so a
    large body does not hold the event loop for its whole parse."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as StarletteRequest

    pieces = iter(range(0, len(body), PARSE_CHUNK))

    async def receive():
        start = next(pieces, len(body))
        await asyncio.sleep(0)
        return {"type": "http.request", "body": body[start:start + PARSE_CHUNK], "more_body": start + PARSE_CHUNK < len(body)}

    try:
        form = await StarletteRequest(request.scope, receive).form(max_files=max_files, max_fields=max_files)
    except HTTPException as e:  # Starlette's word for a multipart body it refuses
        if "Too many" in e.detail:
            raise RequestError(413, f"multipart body has more than {max_files} parts (the limit per request)") from None
        raise RequestError(400, f"unreadable multipart body ({e.detail})") from None
    except Exception as e:
        raise RequestError(400, f"unreadable multipart body ({type(e).__name__})") from None
    files = [await value.read() for _, value in form.multi_items() if hasattr(value, "read")]
    await form.close()
    if not files:
        raise RequestError(400, "multipart body has no file parts")
    return files


def _check_unique(ids: list[str], labels: list[str]) -> None:
    """400 naming the first part whose SOPInstanceUID an earlier part of the request has (a slice would count twice
    in its series, and a 2.5D stack would be built around the wrong one). Slices without one cannot be compared
    and pass."""
    seen: dict[str, str] = {}
    for image_id, label in zip(ids, labels):
        if image_id and image_id in seen:
            raise RequestError(400, f"{label}: image {image_id} is also {seen[image_id]}; send each slice once per request")
        seen.setdefault(image_id, label)


def _keys(uids: list[str]) -> list[str]:
    """A request's slices' keys for ordering them: "id:" + the header's UID, or "part:" + the zero-padded part number
    where the header has none (part 10 then follows part 9). The prefixes differ, so no header, however odd, can make
    a UID equal a placeholder; keys are never answered or logged, and never hold a file name."""
    return [f"id:{uid}" if uid else f"part:{row + 1:06d}" for row, uid in enumerate(uids)]


def _stack_neighbors(decoded: list[tuple], neighbors: int) -> list[np.ndarray]:
    """2.5D input from one request: each slice between its neighbours among the request's slices of its series,
    as in training (raysys.data.neighbor_paths: the slice itself past a series' end, across a gap or without a
    place in its series), so a lone slice is itself repeated. decoded: (image, image_id, series_id, position, z) per
    part, SOPInstanceUIDs unique (_decode checks it: neighbor_paths finds a slice by its id)."""
    from raysys.data import neighbor_paths

    # Ties in position are broken by image id, as in training and in _score_series.
    frame = pd.DataFrame({"image_id": _keys([d[1] for d in decoded]), "path": [str(i) for i in range(len(decoded))],
                          "series_id": _keys([d[2] for d in decoded]), "position": [d[3] for d in decoded],
                          "z": [d[4] for d in decoded]})
    return [np.concatenate([decoded[int(i)][0] for i in stack]) for stack in neighbor_paths(frame, frame, neighbors)]


def _query_value(request: Request, name: str) -> str | None:
    """A query parameter's value, None without it; 400 when it is given more than once (`?labels=any&labels=subdural`
    would otherwise silently mean the last one: write `labels=any,subdural`)."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise RequestError(400, f"{name}: given {len(values)} times; give it once, its values comma-separated "
                                f"({name}=a,b)")
    return values[0] if values else None


def _asked_parts(request: Request) -> list[int] | None:
    """The 1-based part numbers of `?parts=2,5`, sorted and without repeats; None without the parameter. 400 for a
    raw body (one part) or anything but positive whole numbers."""
    given = _query_value(request, "parts")
    if given is None:
        return None
    if not _is_multipart(request):
        raise RequestError(400, "parts: only for a multipart body (a raw body is one part, always explained)")
    numbers = [n.strip() for n in given.split(",")]
    wrong = [n for n in numbers if not (n.isdigit() and int(n) > 0)]
    if wrong or not numbers:
        raise RequestError(400, f"parts: {', '.join(map(repr, wrong))} is not a part number; give 1-based part numbers, "
                                "comma-separated (parts=2,5), or leave it out for every part")
    return sorted({int(n) for n in numbers})


def _named(labels: list[str], values: np.ndarray) -> dict[str, float]:
    return dict(zip(labels, map(float, values)))


def _env_token() -> str | None:
    """RAYSYS_API_TOKEN without surrounding whitespace (a trailing newline from `$(cat file)` or an env file would
    otherwise refuse every client); None when it is unset, empty or only whitespace."""
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _read_token(token_file: str | None) -> str | None:
    """The bearer token on this node: token_file's content, else RAYSYS_API_TOKEN, else None (both stripped)."""
    if token_file is None:
        return _env_token()
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise RuntimeError(f"serve token_file {token_file}: cannot read it on this node ({e.strerror or e})") from None
    if not token:
        raise RuntimeError(f"serve token_file {token_file} is empty")
    return token


def _node_token(token_file: str | None, require_token: bool) -> str | None:
    """_read_token; when the driver asked for a token and this node has none, refuse to start rather than serve
    openly (a RuntimeError that Serve shows as the deployment's failure)."""
    token = _read_token(token_file)
    if require_token and token is None:
        raise RuntimeError(f"a bearer token is required but {TOKEN_ENV} is not set on this node; "
                           "set it in the node's environment before `ray start`, or use serve token_file")
    return token


def _unauthorized(request: Request, token: str | None) -> JSONResponse | None:
    """401 JSON unless the request carries `Authorization: Bearer <token>` (compared in constant time); None when it
    does or no token is configured."""
    if token is None:
        return None
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return None


# A replica told to stop looks for requests still running every SHUTDOWN_LOOP_S (Serve's default: 2 s) and stops
# once none are: two idle apps went down in 5.3 s with Serve's default, in 1.6 s with this (2 cores).
SHUTDOWN_LOOP_S = 0.25


# Helpers above stand before the class on purpose: Serve serializes the class when the
# decorator runs, and names defined after it would be missing in the replica.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  graceful_shutdown_wait_loop_s=SHUTDOWN_LOOP_S)
@serve.ingress(api)
class HemorrhageService:
    def __init__(self, checkpoint: str, max_batch_size: int, batch_wait_ms: float, max_body_bytes: int,
                 max_files: int = 64, decode_limits: tuple[int, int] | None = None, decode_threads: int = 1,
                 token_file: str | None = None, require_token: bool = False):
        import torch

        from raysys.model import load_checkpoint, read_meta
        from raysys.sequence import is_sequence, load_sequence

        self.token = _node_token(token_file, require_token)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.gru = None  # the series GRU of a sequence checkpoint; None for a CNN checkpoint
        if is_sequence(read_meta(checkpoint)):
            import raysys.data  # noqa: F401  (order_series; imported here rather than on the first request)

            stage = load_sequence(checkpoint, self.device)
            self.model, self.gru, self.meta = stage.cnn.model, stage.model, stage.meta
        else:
            loaded = load_checkpoint(checkpoint, self.device)
            self.model, self.meta = loaded.model, loaded.meta
        self.stage = "cnn" if self.gru is None else "sequence"
        self.neighbors = self.meta.get("neighbors", 0)  # 2.5D: slices on each side, taken from the request
        self.windows, self.size = self.meta["windows"], self.meta["image_size"]
        from raysys.windowing import format_windows, parse_windows

        # /v1/explain names each input channel: a preset's name, else CENTER/WIDTH
        self.window_names = [(format_windows([w]), w) for w in parse_windows(self.windows)]
        self.checkpoint_info = {"checkpoint": checkpoint.rstrip("/").rsplit("/", 1)[-1], "epoch": self.meta["epoch"],
                                "val_weighted_log_loss": self.meta["metrics"].get("val_weighted_log_loss")}
        if self.gru is not None:  # a CNN checkpoint's answers stay exactly as they were
            self.checkpoint_info["stage"] = self.stage
        from raysys.dicom import DEFAULT_LIMITS, DecodeLimits

        self.max_body_bytes, self.max_files = max_body_bytes, max_files
        self.limits = DecodeLimits(*decode_limits) if decode_limits else DEFAULT_LIMITS
        # Two decode lanes: bodies up to SMALL_BODY never wait behind a large (possibly hostile) one.
        # A decode thread holds the GIL for long stretches of pure Python (pydicom), and at Python's default
        # 5 ms switch interval each of a forward pass's ~300 GIL hand-offs waits that long: measured on
        # 2 cores, a 1-image forward took 1.38 s beside a hostile decode (0.02 s alone), 0.08 s at 0.1 ms.
        sys.setswitchinterval(GIL_SWITCH_S)
        self.small_lane = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self.large_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-large")
        self._turn: asyncio.Event | None = None
        self._in_turn = 0
        # One model pass at a time: `embed` and `explain` hook the model's modules, and a hook sees every thread's pass.
        self._model_lock = threading.Lock()
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms, "batches": 0, "images": 0,
                         "explain_batches": 0, "explain_images": 0}
        for batched in (self.infer, self.explain_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        from importlib import resources

        self.viewer = resources.files("raysys") / "viewer"  # the web page's files, shipped as package data

    async def score(self, images: list[np.ndarray], batched=None) -> list:
        """`batched`'s output (default `infer`, the forward pass) for each of a request's preprocessed images,
        batched with other requests.

        Serve forms the next batch as soon as the previous one is formed, not when the model is free,
        so under load it would queue many small batches behind a busy model. Requests therefore take
        turns in groups: everything that arrived while a group was being scored enters the batch
        queue together when that group is done. An idle service adds no wait; a cancelled request
        still ends its group's turn.
        """
        batched = batched or self.infer
        if self._turn is None:
            self._turn = asyncio.Event()  # made on the replica's own event loop
            self._turn.set()
        await self._turn.wait()
        self._turn.clear()  # later arrivals wait for the next turn; those woken with this one go on
        self._in_turn += 1
        try:
            return await asyncio.gather(*(batched(image) for image in images))
        finally:
            self._in_turn -= 1
            if self._in_turn == 0:
                self._turn.set()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, images: list[np.ndarray]) -> list:
        """Micro-batched forward pass (`_forward`). It runs in a worker thread (torch releases the GIL), so the
        event loop goes on receiving and decoding requests meanwhile; Serve runs one batch at a time."""
        self.batching["batches"] += 1
        self.batching["images"] += len(images)
        return await asyncio.to_thread(self._forward, np.stack(images))

    def _forward(self, images: np.ndarray) -> list:
        """(B, C, S, S) uint8 -> per image: probabilities (6,) for a CNN checkpoint; for a sequence checkpoint
        (features (F,), logits (6,)), the GRU's input (F = 0 when it reads logits only)."""
        from raysys.engine import embed, infer
        from raysys.sequence import stored_features

        with self._model_lock:
            if self.gru is None:
                return list(infer(self.model, images, self.device))
            features, logits = embed(self.model, images, self.device)
        # Rounded through float16 as training and batch predict store them (raysys.predict.Embedder): the GRU
        # reads here what it was trained and validated on.
        features = stored_features(features[:, : self.gru.features]).astype(np.float32)
        return list(zip(features, logits))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def explain_batch(self, items: list[tuple[np.ndarray, tuple[int, ...]]]) -> list:
        """Micro-batched heat maps (`_explain_forward`) of (image, label indices) items, in a worker thread like
        `infer`."""
        self.batching["explain_batches"] += 1
        self.batching["explain_images"] += len(items)
        return await asyncio.to_thread(self._explain_forward, items)

    def _explain_forward(self, items: list[tuple[np.ndarray, tuple[int, ...]]]) -> list:
        """Per (image (C, S, S) uint8, label indices) item: (probabilities (6,), heat maps (L, S, S) float32 in [0, 1]
        of its labels) of the CNN, from raysys.explain.explain, whose forward pass is `infer`'s, at its default layer
        and method. One pass for the batch, for every label any item asked for."""
        from raysys.explain import explain

        wanted = sorted(set().union(*(labels for _, labels in items)))
        with self._model_lock:
            probabilities, maps = explain(self.model, np.stack([image for image, _ in items]), self.device,
                                          labels=wanted)
        row = {label: i for i, label in enumerate(wanted)}
        return [(p, m[[row[label] for label in labels]]) for p, m, (_, labels) in zip(probabilities, maps, items)]

    async def _embed_and_explain(self, item: tuple[np.ndarray, tuple[int, ...] | None]) -> tuple:
        """A sequence checkpoint's explain: the GRU's input (as for predict) and, unless the labels are None (a part
        not asked for), the CNN's heat maps of one image."""
        if item[1] is None:
            return await self.infer(item[0]), None
        return tuple(await asyncio.gather(self.infer(item[0]), self.explain_batch(item)))

    async def forward(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
        """One HTTP request relayed by the Gateway, answered by this replica's own routes: (status, raw headers,
        body). scope: the request's ASGI scope (plain fields only); body: already read within max_body_bytes."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        start, chunks = {}, []

        async def receive():
            return pending.pop() if pending else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)  # the FastAPI app of @serve.ingress, with this replica as `self`
        return start["status"], start.get("headers", []), b"".join(chunks)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "device": self.device.type}

    @api.get("/")
    async def index(self):
        return self._viewer_file("index.html")

    @api.get("/viewer/{name:path}")
    async def viewer_file(self, name: str):
        return self._viewer_file(name)

    def _viewer_file(self, name: str):
        """A file of the viewer's folder by its plain name, with its content type; 404 JSON for any other name
        (a path, a hidden file, a kind not in VIEWER_TYPES). Public: the page holds no data, the API needs the token."""
        kind = VIEWER_TYPES.get(Path(name).suffix.lower())
        plain = self.viewer.is_dir() and name in {f.name for f in self.viewer.iterdir() if f.is_file()}
        if kind is None or not plain or name.startswith("."):
            return JSONResponse({"error": "not found: /viewer/ serves the viewer's files by plain name"}, status_code=404)
        return Response(self.viewer.joinpath(name).read_bytes(), media_type=kind,
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    @api.get("/v1/model")
    async def describe(self, request: Request):
        if (denied := self._authorize(request)) is not None:
            return denied
        metrics = {k: v for k, v in self.meta["metrics"].items() if k != "history"}
        info = {"stage": self.stage, "labels": self.meta["labels"], "windows": self.windows, "image_size": self.size,
                "contract": self.meta["contract"], "model": self.checkpoint_info, "batching": self.batching,
                "metrics": metrics}
        # What a client must know before it sends: the viewer checks a series against the limits, and for a 2.5D
        # checkpoint sends a slice's neighbours with it.
        info["neighbors"] = self.neighbors
        info["limits"] = {"max_body_bytes": self.max_body_bytes, "max_files": self.max_files}
        if self.gru is not None:  # the GRU's shape and its CNN's own score; not the CNN's path (a training machine's)
            info["sequence"] = {"features": self.gru.features, "hidden": self.gru.hidden}
            info["cnn"] = {k: self.meta["cnn"].get(k) for k in ("epoch", "val_weighted_log_loss")}
        return JSONResponse(json.loads(storage.to_json(info)))

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        start = time.perf_counter()
        if (denied := self._authorize(request)) is not None:
            return denied
        try:
            decoded = await self._decode(request)
        except RequestError as e:
            return _refused("predict", e)
        outputs = await self.score(self._model_inputs(decoded))
        if self.gru is not None:
            return await self._answer_series(request, decoded, outputs, start)
        latency = (time.perf_counter() - start) * 1000
        results = [{"image_id": d[1], "probabilities": _named(self.meta["labels"], p),
                    "model": self.checkpoint_info, "latency_ms": round(latency, 2)} for d, p in zip(decoded, outputs)]
        return results[0] if len(results) == 1 and not _is_multipart(request) else {"results": results}

    @api.post("/v1/explain")
    async def explain(self, request: Request):
        """Predict's answer with heat maps and the windowed input per slice (see the module docstring).

        For a sequence checkpoint the probabilities are the sequence stage's, exactly as /v1/predict answers them,
        while the heat maps explain the CNN's per-slice evidence (its cnn_probabilities): the GRU adds the series'
        context to the CNN's scores and has no pixels of its own to point at."""
        start = time.perf_counter()
        if (denied := self._authorize(request)) is not None:
            return denied
        try:
            labels = self._explained_labels(request)
            asked = _asked_parts(request)
            decoded = await self._decode(request)
            rows = self._explained_rows(asked, len(decoded))
        except RequestError as e:
            return _refused("explain", e)
        inputs = self._model_inputs(decoded)  # every part: a 2.5D stack or the GRU may need the parts not asked for
        if self.gru is not None:
            items = [(image, labels if row in rows else None) for row, image in enumerate(inputs)]
            outputs, explained = zip(*await self.score(items, self._embed_and_explain))
            shown = await asyncio.to_thread(self._shown, [decoded[r] for r in rows], [explained[r][1] for r in rows],
                                            labels)
            return await self._answer_series(request, decoded, list(outputs), start, dict(zip(rows, shown)))
        explained = await self.score([(inputs[r], labels) for r in rows], self.explain_batch)
        shown = await asyncio.to_thread(self._shown, [decoded[r] for r in rows], [maps for _, maps in explained], labels)
        results = [{"image_id": decoded[r][1], "probabilities": _named(self.meta["labels"], p), **more}
                   for r, (p, _), more in zip(rows, explained, shown)]
        answer = {"model": self.checkpoint_info, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}
        return {**results[0], **answer} if not _is_multipart(request) else {"results": results, **answer}

    @staticmethod
    def _explained_rows(asked: list[int] | None, parts: int) -> list[int]:
        """0-based indices of the parts to explain: those of `?parts=` (1-based), else all. 400 naming a number past
        the request's parts."""
        if asked is None:
            return list(range(parts))
        past = [n for n in asked if n > parts]
        if past:
            raise RequestError(400, f"parts: {', '.join(map(str, past))} past the request's {parts} parts")
        return [n - 1 for n in asked]

    def _explained_labels(self, request: Request) -> tuple[int, ...]:
        """The label indices of `?labels=any,subdural` (comma-separated names, in the order given); all six without
        the parameter. 400 naming an unknown label."""
        given = _query_value(request, "labels")
        if given is None:
            return tuple(range(len(self.meta["labels"])))
        names = [name.strip() for name in given.split(",") if name.strip()]
        unknown = [name for name in names if name not in self.meta["labels"]]
        if unknown or not names:
            raise RequestError(400, f"labels: {', '.join(unknown) or 'none given'}; choose among "
                                    f"{', '.join(self.meta['labels'])} (comma-separated), or leave it out for all")
        return tuple(dict.fromkeys(self.meta["labels"].index(name) for name in names))

    def _shown(self, decoded: list[tuple], maps: list[np.ndarray], labels: tuple[int, ...]) -> list[dict]:
        """Per part: its heat maps (L, S, S) of the label indices `labels` and its own windowed channels as base64
        PNGs, with what made them. PNG and base64 encoding take milliseconds per slice: this runs in a worker
        thread."""
        from raysys.explain import DEFAULT_LAYER, DEFAULT_METHOD

        how = {"method": DEFAULT_METHOD, "layer": DEFAULT_LAYER}  # explain()'s defaults, whatever they become
        names = [self.meta["labels"][k] for k in labels]
        return [{"heatmaps": {name: _b64_png(m) for name, m in zip(names, part_maps)},
                 # d[0]: the slice's own windows (C, S, S), the middle of a 2.5D stack
                 "windows": [{"name": name, "center": w.center, "width": w.width, "png": _b64_png(channel)}
                             for (name, w), channel in zip(self.window_names, d[0])],
                 "size": self.size, "explain": how}
                for d, part_maps in zip(decoded, maps)]

    async def _decode(self, request: Request) -> list[tuple]:
        """A request's DICOM bodies decoded in the thread lanes, in part order: (image, image id, series id,
        position, z) each (see `_preprocess`). Raises RequestError naming the body or part at fault."""
        bodies = await self._bodies(request)
        loop = asyncio.get_running_loop()
        labels = ["body"] if len(bodies) == 1 and not _is_multipart(request) else \
            [f"part {i + 1}" for i in range(len(bodies))]
        decoded = await asyncio.gather(*(loop.run_in_executor(
            self.small_lane if len(body) <= SMALL_BODY else self.large_lane, self._preprocess, body, label)
            for body, label in zip(bodies, labels)), return_exceptions=True)
        first_error = next((d for d in decoded if isinstance(d, BaseException)), None)
        if first_error is not None:
            raise first_error
        if self.gru is not None or self.neighbors:  # slices are placed among each other by their ids
            _check_unique([d[1] for d in decoded], labels)
        return decoded

    def _model_inputs(self, decoded: list[tuple]) -> list[np.ndarray]:
        """The model's input per part: the slice's windows, or for a 2.5D checkpoint its stack among its neighbours."""
        if self.neighbors:
            return _stack_neighbors(decoded, self.neighbors)
        return [d[0] for d in decoded]

    async def _answer_series(self, request: Request, decoded: list[tuple], outputs: list[tuple], start: float,
                             extra: dict[int, dict] | None = None) -> dict:
        """A sequence checkpoint's answer (see the module docstring); the GRU runs off the event loop.
        extra: fields to add to a part's result (explain's), by part index; with it, only those parts are answered."""
        results, series, rows = await asyncio.to_thread(self._score_series, decoded, outputs)
        if extra is not None:
            results = [{**result, **extra[row]} for result, row in zip(results, rows) if row in extra]
        latency = round((time.perf_counter() - start) * 1000, 2)
        if not _is_multipart(request):  # a raw body: one slice, the CNN checkpoint's single answer plus its CNN's
            one = {k: v for k, v in results[0].items() if k not in ("series", "slice")}
            return {**one, "model": self.checkpoint_info, "latency_ms": latency}
        return {"results": results, "series": series, "model": self.checkpoint_info, "latency_ms": latency}

    def _score_series(self, decoded: list[tuple], outputs: list[tuple]) -> tuple[list[dict], list[dict], list[int]]:
        """(results in slice order, series after series; one summary per series; each result's part index) of a
        request's slices.

        decoded: (image, image_id, series_id, position, z) per part; outputs: `_forward`'s (features, logits) per part.
        """
        from raysys.data import order_series
        from raysys.sequence import score_series, series_items, sigmoid

        frame = pd.DataFrame({
            "image_id": [d[1] for d in decoded],
            # A slice without a SeriesInstanceUID is a series of its own (even when it has no SOPInstanceUID either).
            "series_id": _keys([d[2] for d in decoded]),
            "position": [d[3] for d in decoded],
            "z": [d[4] for d in decoded],  # which kind of position (mm or InstanceNumber), as in training
            "row": np.arange(len(decoded)),
        })
        ordered = order_series(frame)
        # Series numbered by the part each first appears in: order_series sorts them by UID, which stays private.
        first_part = ordered.groupby("series", sort=False)["row"].transform("min")
        ordered = ordered.assign(first_part=first_part).sort_values(["first_part", "slice"], kind="stable")
        features, logits = np.stack([o[0] for o in outputs]), np.stack([o[1] for o in outputs])
        items = series_items(ordered, features, logits, labels=False)
        labels, results, series, rows = self.meta["labels"], [], [], []
        for number, (item, probabilities) in enumerate(zip(items, score_series(self.gru, items, self.device))):
            cnn = sigmoid(item["cnn_logits"])
            results += [{"image_id": str(image_id), "series": number, "slice": k, "probabilities": _named(labels, p),
                         "cnn_probabilities": _named(labels, c)}
                        for k, (image_id, p, c) in enumerate(zip(item["image_id"], probabilities, cnn))]
            series.append({"series": number, "slices": len(probabilities), "max": _named(labels, probabilities.max(axis=0))})
            rows += [int(row) for row in item["row"]]
        return results, series, rows

    def _authorize(self, request: Request):
        """The Gateway has checked already; checked again so that a replica reached another way is not open."""
        return _unauthorized(request, self.token)

    async def _bodies(self, request: Request) -> list[bytes]:
        """The DICOM bodies of a request: the raw body, or a multipart body's file parts in order."""
        body = await read_body(request, self.max_body_bytes)
        if _is_multipart(request):
            return await _multipart_files(request, body, self.max_files)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/dicom", "application/octet-stream"):
            raise RequestError(415, f"send the DICOM as application/dicom or multipart/form-data, not {kind or 'nothing'}")
        if not body:
            raise RequestError(400, "empty body")
        return [body]

    def _preprocess(self, body: bytes, label: str) -> tuple[np.ndarray, str, str, float, float]:
        """(image, image id, series id, position along the series' axis, z) of one DICOM body; runs in the decode
        pool. `label` names it in errors. The series id orders slices; it is never answered or logged."""
        from raysys.dicom import DicomDecodeError, UnsupportedImageError, require_ct
        from raysys.presets import dicom_to_image

        try:
            image, meta = dicom_to_image(body, self.windows, self.size, name=label, limits=self.limits)
            require_ct(meta, label)  # as training's scan: Hounsfield windows mean nothing for MR
        except UnsupportedImageError as e:
            raise RequestError(422, str(e)) from None
        except DicomDecodeError as e:
            raise RequestError(400, str(e)) from None
        return image, meta.image_id, meta.series_id, meta.position, meta.z


def _app_path(request: Request) -> str:
    """The request's path within the application (without the route prefix Serve put in root_path)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


HEAD_NODE = "node:__internal_head__"  # a resource only Ray's head node has (1 unit)
SCOPE_FIELDS = ("type", "asgi", "http_version", "scheme", "method", "path", "raw_path", "root_path", "query_string",
                "headers", "server", "client")  # what the Gateway passes on of a request's ASGI scope
LOST = (RayActorError, ReplicaUnavailableError)  # the replica holding a request died or stopped answering
RETRIED_HEADER = "x-raysys-retried"  # on an answer the Gateway got from a second replica after losing the first


# max_ongoing_requests: requests it holds at once, bodies included (at most max_body_bytes each); the rest wait in
# Serve's queue. 256: four replicas' worth at HemorrhageService's 64.
@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}}, max_ongoing_requests=256,
                  graceful_shutdown_wait_loop_s=SHUTDOWN_LOOP_S)
class Gateway:
    """The HTTP ingress: reads each request's body (within max_body_bytes) and relays it to a HemorrhageService
    replica, which answers it with its own routes.

    It exists for what a replica cannot do for itself: answer when it is gone. A replica lost with requests in
    flight (its node crashed, it ran out of memory) fails them with RayActorError; the Gateway sends each such
    request once more, to another replica (scoring is a pure function of the body, so a second try is safe), and
    answers 503 JSON with Retry-After if that fails too. Without it Serve's proxy answers them with a plain-text
    500. The Gateway holds no model and reserves no CPU; it runs on the head node, which a cluster cannot lose
    without losing Serve itself, so no node loss takes it with the replicas.
    """

    def __init__(self, service, max_body_bytes: int, token_file: str | None = None, require_token: bool = False):
        self.token = _node_token(token_file, require_token)
        self.service, self.max_body_bytes = service, max_body_bytes
        self.lost: set[str] = set()  # replicas reported lost (each is logged once)

    async def __call__(self, request: Request) -> Response:
        # The token is checked before a byte of the body is read: without it a stranger's 20 MiB would be read and
        # shipped to a replica only to be refused there. Only the API needs it; the page, its files and /healthz
        # are public (GETs, whose bodies no route reads, so none is relayed).
        reading = request.method not in ("GET", "HEAD")
        if (reading or _app_path(request).startswith("/v1/")) and (denied := _unauthorized(request, self.token)):
            log.info("%s rejected: 401 missing or wrong bearer token", request.url.path)
            return denied
        try:
            body = await read_body(request, self.max_body_bytes) if reading else b""
        except RequestError as e:
            return _refused(request.url.path, e)
        scope = {k: request.scope[k] for k in SCOPE_FIELDS if k in request.scope}
        for attempt in (1, 2):
            try:
                status, headers, content = await self.service.forward.remote(scope, body)
                break
            except LOST as e:
                self._report(e)
                if attempt == 2:
                    return JSONResponse({"error": f"{request.url.path}: the model replica answering it was lost "
                                                  f"({type(e).__name__}), and so was the retry; try again shortly"},
                                        status_code=503, headers={"Retry-After": "1"})
            except (BackPressureError, DeploymentUnavailableError) as e:
                return JSONResponse({"error": f"{request.url.path}: {e}"}, status_code=503, headers={"Retry-After": "1"})
        response = Response(content, status_code=status)
        response.raw_headers = list(headers)  # the replica's own, content-length included
        if attempt == 2:
            response.raw_headers.append((RETRIED_HEADER.encode(), b"1"))  # tells the client (and the tests) why it took long
        return response

    def _report(self, error: Exception) -> None:
        """One warning per lost replica (by its actor id), however many requests it held."""
        replica = str(getattr(error, "actor_id", None) or type(error).__name__)
        if replica not in self.lost:
            self.lost.add(replica)
            log.warning("model replica %s lost (%s): its requests in flight are retried once on another replica, "
                        "then answered 503", replica, type(error).__name__)


def build_app(checkpoint: str, cfg: ServeConfig = ServeConfig()):
    """The Serve application for a checkpoint directory (local path or URI; nothing heavy happens here).

    On CPU a replica's forward pass uses as many threads as it reserves CPUs (Ray sets OMP_NUM_THREADS)."""
    from raysys.model import read_meta

    checkpoint = storage.resolve(checkpoint)
    read_meta(checkpoint)  # fail now, with a clear message, if it is not a checkpoint
    # The token itself never travels in the application (Serve's API would show it): each replica reads its
    # node's RAYSYS_API_TOKEN or token_file, and refuses to start without one when the driver has one.
    require_token = bool(cfg.token_file or _env_token())
    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    options = {"num_replicas": cfg.replicas, "ray_actor_options": actor}
    service = HemorrhageService.options(**options).bind(
        checkpoint, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
        max_body_bytes=cfg.max_body_bytes, max_files=cfg.max_files, decode_limits=(cfg.max_image_side, cfg.max_image_bytes),
        decode_threads=max(1, round(cfg.cpus_per_replica)), token_file=cfg.token_file, require_token=require_token)
    return Gateway.bind(service, max_body_bytes=cfg.max_body_bytes, token_file=cfg.token_file, require_token=require_token)


def app(args: dict):
    """Application builder for `serve run raysys.serve:app checkpoint=DIR` and serve config files.

    Other arguments are ServeConfig fields (max_batch_size, batch_wait_ms, max_body_bytes, ...)."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ValueError(f"raysys.serve:app needs checkpoint=DIR; optional: {sorted(asdict(ServeConfig()))}")
    return build_app(checkpoint, build_config(ServeConfig, args, "raysys.serve:app"))
