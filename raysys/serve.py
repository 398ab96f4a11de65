"""Ray Serve: an HTTP endpoint that scores CT slices with a checkpoint; build_app(checkpoint).

POST /v1/predict  DICOM as the raw body (Content-Type: application/dicom) or multipart file(s)
GET  /v1/model    labels, windows, image size and validation metrics of the checkpoint
GET  /healthz     200 once the model is loaded

Preprocessing is the checkpoint's own (windows, size, label order from meta.json,
through the same presets as training). Responses and logs carry the image id
(SOPInstanceUID) only, never PatientName, PatientID or dates.
"""


import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import asdict

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from raysys import storage
from raysys.config import ServeConfig, build_config

log = logging.getLogger("raysys.serve")

TOKEN_ENV = "RAYSYS_API_TOKEN"  # when set, requests need `Authorization: Bearer <token>`

api = FastAPI(title="raysys", description="Intracranial hemorrhage probabilities for head-CT DICOM slices")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _multipart_files(request: Request, body: bytes) -> list[tuple[str, bytes]]:
    """Files of a multipart body (already size-checked); the body is replayed into Starlette's parser."""
    from starlette.requests import Request as StarletteRequest

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, receive).form()
    except Exception as e:
        raise RequestError(400, f"unreadable multipart body ({e})") from None
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items() if hasattr(value, "read")]
    if not files:
        raise RequestError(400, "multipart body has no file parts")
    return files


# Helpers above stand before the class on purpose: Serve serializes the class when the
# decorator runs, and names defined after it would be missing in the replica.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class HemorrhageService:
    def __init__(self, checkpoint: str, max_batch_size: int, batch_wait_ms: float, max_body_bytes: int):
        import torch

        from raysys.model import load_checkpoint

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_checkpoint(checkpoint, self.device)
        self.model, self.meta = loaded.model, loaded.meta
        self.windows, self.size = self.meta["windows"], self.meta["image_size"]
        self.checkpoint_info = {"checkpoint": checkpoint.rstrip("/").rsplit("/", 1)[-1], "epoch": self.meta["epoch"],
                                "val_weighted_log_loss": self.meta["metrics"].get("val_weighted_log_loss")}
        self.max_body_bytes = max_body_bytes
        self.token = os.environ.get(TOKEN_ENV) or None
        self._turn: asyncio.Event | None = None
        self._in_turn = 0
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms, "batches": 0, "images": 0}
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def score(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for a request's preprocessed images, batched with other requests.

        Serve forms the next batch as soon as the previous one is formed, not when the model is free,
        so under load it would queue many small batches behind a busy model. Requests therefore take
        turns in groups: everything that arrived while a group was being scored enters the batch
        queue together when that group is done. An idle service adds no wait; a cancelled request
        still ends its group's turn.
        """
        if self._turn is None:
            self._turn = asyncio.Event()  # made on the replica's own event loop
            self._turn.set()
        await self._turn.wait()
        self._turn.clear()  # later arrivals wait for the next turn; those woken with this one go on
        self._in_turn += 1
        try:
            return await asyncio.gather(*(self.infer(image) for image in images))
        finally:
            self._in_turn -= 1
            if self._in_turn == 0:
                self._turn.set()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Micro-batched forward pass. It runs in a worker thread (torch releases the GIL), so the event
        loop goes on receiving and decoding requests meanwhile; Serve runs one batch at a time."""
        from raysys.engine import infer

        self.batching["batches"] += 1
        self.batching["images"] += len(images)
        return list(await asyncio.to_thread(infer, self.model, np.stack(images), self.device))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "device": self.device.type}

    @api.get("/v1/model")
    async def describe(self, request: Request):
        if (denied := self._authorize(request)) is not None:
            return denied
        metrics = {k: v for k, v in self.meta["metrics"].items() if k != "history"}
        return JSONResponse(json.loads(storage.to_json(
            {"labels": self.meta["labels"], "windows": self.windows, "image_size": self.size,
             "contract": self.meta["contract"], "model": self.checkpoint_info, "batching": self.batching,
             "metrics": metrics})))

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        start = time.perf_counter()
        if (denied := self._authorize(request)) is not None:
            return denied
        try:
            bodies = await self._bodies(request)
            images, ids = [], []
            for name, body in bodies:
                image, image_id = self._preprocess(body, name)
                images.append(image)
                ids.append(image_id)
        except RequestError as e:
            log.info("predict rejected: %s %s", e.status, e.message)
            return JSONResponse({"error": e.message}, status_code=e.status)
        probabilities = await self.score(images)
        latency = (time.perf_counter() - start) * 1000
        results = [{"image_id": i, "probabilities": dict(zip(self.meta["labels"], map(float, p))),
                    "model": self.checkpoint_info, "latency_ms": round(latency, 2)} for i, p in zip(ids, probabilities)]
        return results[0] if len(results) == 1 and not _is_multipart(request) else {"results": results}

    def _authorize(self, request: Request):
        if self.token is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), self.token.encode()):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _bodies(self, request: Request) -> list[tuple[str, bytes]]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(413, f"body of {int(declared)} bytes is over the {self.max_body_bytes}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(413, f"body is over the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
        body = b"".join(chunks)
        if _is_multipart(request):
            return await _multipart_files(request, body)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/dicom", "application/octet-stream"):
            raise RequestError(415, f"send the DICOM as application/dicom or multipart/form-data, not {kind or 'nothing'}")
        if not body:
            raise RequestError(400, "empty body")
        return [("body", body)]

    def _preprocess(self, body: bytes, name: str) -> tuple[np.ndarray, str]:
        from raysys.dicom import DicomDecodeError, UnsupportedImageError
        from raysys.presets import dicom_to_image

        try:
            image, meta = dicom_to_image(body, self.windows, self.size, name=name)
        except UnsupportedImageError as e:
            raise RequestError(422, str(e)) from None
        except DicomDecodeError as e:
            raise RequestError(400, str(e)) from None
        if meta.modality not in ("CT", ""):
            raise RequestError(422, f"{meta.image_id or name}: not a CT image (Modality {meta.modality})")
        return image, meta.image_id


def build_app(checkpoint: str, cfg: ServeConfig = ServeConfig()):
    """The Serve application for a checkpoint directory (local path or URI; nothing heavy happens here).

    On CPU a replica's forward pass uses as many threads as it reserves CPUs (Ray sets OMP_NUM_THREADS)."""
    from raysys.model import read_meta

    checkpoint = storage.resolve(checkpoint)
    read_meta(checkpoint)  # fail now, with a clear message, if it is not a checkpoint
    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    if os.environ.get(TOKEN_ENV):  # the replicas read the token from their own environment
        actor["runtime_env"] = {"env_vars": {TOKEN_ENV: os.environ[TOKEN_ENV]}}
    options = {"num_replicas": cfg.replicas, "ray_actor_options": actor}
    return HemorrhageService.options(**options).bind(
        checkpoint, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms,
        max_body_bytes=cfg.max_body_bytes)


def app(args: dict):
    """Application builder for `serve run raysys.serve:app checkpoint=DIR` and serve config files.

    Other arguments are ServeConfig fields (max_batch_size, batch_wait_ms, max_body_bytes, ...)."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ValueError(f"raysys.serve:app needs checkpoint=DIR; optional: {sorted(asdict(ServeConfig()))}")
    return build_app(checkpoint, build_config(ServeConfig, args, "raysys.serve:app"))
