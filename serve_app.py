"""framecast on Ray Serve: an OpenAI-compatible Videos API in front of the pipeline.

    POST /v1/videos ─► VideosAPI (ingress: validates, queues in SQLite, runs jobs)
                          ├─ Encoder        text encoder
                          ├─ DenoiserGroup  one replica = N GPU bundles (STRICT_PACK), its context-parallel group inside
                          └─ Decoder × M    a video's tiles spread over the replicas

Start it with `framecast serve --model tiny` or `serve run serve_app:app model=tiny`, or deploy
configs/serve/framecast.yaml. This file is HTTP in and cluster calls out: what a request may
say, how jobs run and what each deployment hosts live in cluster/ (videos, jobs, serving).
"""

import hashlib
import hmac
import json
import os
from typing import Any, Literal

import ray
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from cluster.jobs import QueueFull
from cluster.runtime import connect
from cluster.serving import (
    DenoiserGroupHost,
    ServeArgs,
    Served,
    ServeExecutor,
    StageHost,
    plan_deployments,
    resolve_served,
)
from cluster.videos import API_CODECS, CREATE_FIELDS, NotFound, NotReady, VideoService
from stages.errors import InvalidRequest

HEALTH_CHECK_PERIOD_S = 5.0
FORM_OVERHEAD_BYTES = 64 * 1024  # a create request's fields besides the image


# ---- HTTP: errors in OpenAI's shape, the API key and the body limit --------------------------


def error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """Every route: the API key if one is set (401 otherwise), and a bound on the body (413),
    counted as it arrives, so that an upload over the limit is never read whole."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        digest = getattr(state, "api_key_sha256", None)
        if digest and not _authorized(headers.get("authorization", ""), digest):
            response = error(401, "missing or wrong API key: send Authorization: Bearer <key>", "authentication_error",
                             "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip
            return await response(scope, receive, send)
        limit = getattr(state, "max_body_bytes", None)
        length = headers.get("content-length", "")
        if limit and length.isdigit() and int(length) > limit:
            return await _too_large(limit)(scope, receive, send)
        if not limit:
            return await self.app(scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(limit)(scope, receive, send)


def _chunks(file, size: int = 2**20):
    with file:
        while chunk := file.read(size):
            yield chunk


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return error(413, f"the request body is over {limit} bytes; images may be up to the server's max_image_mb",
                 "invalid_request_error", "request_too_large")  # fmt: skip


def _authorized(header: str, digest: str) -> bool:
    scheme, _, key = header.partition(" ")
    presented = hashlib.sha256(key.strip().encode()).hexdigest()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, digest)


api = FastAPI(
    title="framecast",
    version="0.1.0",
    summary="An OpenAI-compatible Videos API for diffusion video generation on Ray",
    generate_unique_id_function=lambda route: route.name,  # operation ids: create_video, retrieve_video, ...
)
api.add_middleware(Guard)


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path"))
    return error(400, f"{where}: {first['msg']}" if where else first["msg"], "invalid_request_error")


@api.exception_handler(HTTPException)
async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))


# What cluster.videos raises, as the API answers it (one place, not a try in every route).
@api.exception_handler(InvalidRequest)
async def _bad_request(_request: Request, exc: InvalidRequest) -> JSONResponse:
    return error(400, str(exc), "invalid_request_error")


@api.exception_handler(NotFound)
async def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
    message = exc.args[1] if len(exc.args) > 1 else f"no video {exc.args[0]!r}"
    return error(404, message, "invalid_request_error", "video_not_found")


@api.exception_handler(NotReady)
async def _not_ready(_request: Request, exc: NotReady) -> JSONResponse:
    return error(409, str(exc), "invalid_request_error", "video_not_ready")


@api.exception_handler(QueueFull)
async def _queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
    return error(429, str(exc), "rate_limit_error", "queue_full", {"Retry-After": str(exc.retry_after_s)})


# ---- the API's documents (for the OpenAPI schema; the objects are made in cluster.videos) ------


class VideoError(BaseModel):
    code: str | None
    message: str | None


class Video(BaseModel):
    model_config = ConfigDict(extra="allow")  # framecast's own fields follow OpenAI's
    id: str
    object: Literal["video"]
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    error: VideoError | None
    prompt: str
    seconds: str
    size: str
    mlflow_run_id: str | None


class VideoList(BaseModel):
    object: Literal["list"]
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"]
    deleted: bool


class Model(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


_FIELD_SCHEMA = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"}}
_CREATE_SCHEMA = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        **{name: _FIELD_SCHEMA[kind] for name, kind in CREATE_FIELDS.items()},
        "seconds": {"type": "string", "description": "clip length; the nearest frame count the model makes"},
        "size": {"type": "string", "description": "WIDTHxHEIGHT, e.g. 720x480"},
        "codec": {"type": "string", "enum": list(API_CODECS), "description": "how the video is stored"},
    },
}
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _CREATE_SCHEMA},
            "multipart/form-data": {
                "schema": {
                    **_CREATE_SCHEMA,
                    "properties": {
                        **_CREATE_SCHEMA["properties"],
                        "input_reference": {"type": "string", "format": "binary", "description": "image-to-video"},
                    },
                }
            },
        },
    }
}
_ERRORS = {code: {"description": text} for code, text in (
    (400, "invalid request: what was wrong and what is allowed"), (401, "missing or wrong API key"),
    (404, "no such video"), (409, "the video is not completed"), (413, "body over the limit"),
    (415, "neither JSON nor multipart/form-data"), (429, "the queue is full: see Retry-After"),
)}  # fmt: skip
# OpenAPI links: what a client (and schemathesis's stateful run) does next with a video's id.
_BY_ID = {"video_id": "$response.body#/id"}
_NEXT = {name: {"operationId": operation, "parameters": _BY_ID} for name, operation in (
    ("RetrieveVideo", "retrieve_video"), ("VideoContent", "video_content"), ("DeleteVideo", "delete_video"),
)}  # fmt: skip
_WITH_LINKS = {**_ERRORS, 200: {"links": _NEXT}}  # a video's answer: where its id leads


async def read_create_body(request: Request, max_image_bytes: int) -> tuple[dict[str, Any], bytes | None]:
    """The fields of a create request (JSON, or a form as the openai client sends) and the image."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise InvalidRequest("the body is not valid JSON") from None
        except RecursionError:  # e.g. "[" a thousand deep: Python's parser gives up
            raise InvalidRequest("the body's JSON is nested too deep; a create request is one flat object") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        if "input_reference" in body:
            raise InvalidRequest("send input_reference as a file in a multipart/form-data request")
        return body, None
    if not kind and not await request.body():  # nothing sent: say what is missing
        return {}, None
    if kind != "multipart/form-data":  # not url-encoded forms either: nothing sends them, and they carry no file
        raise HTTPException(415, f"send application/json or multipart/form-data (got {kind or 'no content type'!r})")
    form = await request.form(max_files=1, max_fields=len(CREATE_FIELDS) + 1, max_part_size=FORM_OVERHEAD_BYTES)
    fields, image = {}, None
    for name, value in form.multi_items():
        if name in fields or (name == "input_reference" and image is not None):
            raise InvalidRequest(f"{name} is given twice")
        if name == "input_reference":
            if not isinstance(value, UploadFile):
                raise InvalidRequest("input_reference must be an image file")
            image = await value.read(max_image_bytes + 1)
            if len(image) > max_image_bytes:
                raise HTTPException(413, f"input_reference is over {max_image_bytes} bytes")
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"{name} must be a form field, not a file")
        else:
            fields[name] = value
    return fields, image


# ---- the deployments ----------------------------------------------------------------------


# One call at a time per stage replica, as a stage actor runs them: two videos never share a
# device's memory, and a video's tile shares go to different decoder replicas.
@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S, max_ongoing_requests=1)
class Encoder(StageHost):
    """The text encoder, in a replica of its own."""


@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S, max_ongoing_requests=16)
class DenoiserGroup(DenoiserGroupHost):
    """One replica: N bundles (a GPU each) placed STRICT_PACK, one denoiser rank in each."""


@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S, max_ongoing_requests=1)
class Decoder(StageHost):
    """A VAE decoder; with several replicas, each decodes a share of a video's tiles."""


@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class VideosAPI:
    """HTTP in; jobs into the durable queue; the runners take them through the other deployments."""

    def __init__(self, encoder, denoiser, decoder, served: Served):
        api.state.api_key_sha256 = served.api_key_sha256
        api.state.max_body_bytes = served.max_image_bytes + FORM_OVERHEAD_BYTES
        self.max_image_bytes = served.max_image_bytes
        self.service = VideoService(served, ServeExecutor(encoder, denoiser, decoder, served.decoders))
        # MLflow's default store puts artifacts under ./mlruns: here, beside the videos.
        os.chdir(served.data_dir)
        self.service.start()

    def check_health(self) -> None:
        self.service.check_health()

    def drain(self) -> int:
        """Stop taking jobs and give those in progress back to the queue (`framecast serve` stopping);
        how many went back."""
        return self.service.stop()

    def __del__(self):  # Serve shutting the replica down gracefully
        if hasattr(self, "service"):
            self.service.stop()

    @api.post("/v1/videos", response_model=Video, openapi_extra=_CREATE_BODY, responses=_WITH_LINKS)
    async def create_video(self, request: Request):
        """Queue a video (429 with Retry-After when the queue is full)."""
        fields, image = await read_create_body(request, self.max_image_bytes)
        return await run_in_threadpool(self.service.create, fields, image)

    @api.get("/v1/videos", response_model=VideoList, responses=_ERRORS)
    async def list_videos(
        self,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
    ):
        return await run_in_threadpool(self.service.page, after, limit, order)

    @api.get("/v1/videos/{video_id}", response_model=Video, responses=_WITH_LINKS)
    async def retrieve_video(self, video_id: str):
        return await run_in_threadpool(self.service.retrieve, video_id)

    @api.get("/v1/videos/{video_id}/content", responses={**_ERRORS, 200: {"content": {
        "video/mp4": {}, "video/webm": {}, "image/png": {}}}})  # fmt: skip
    async def video_content(
        self, video_id: str, variant: Literal["video", "interpolated", "thumbnail", "spritesheet"] = "video"
    ):
        """The video (MP4, or WebM with codec webm); `variant=interpolated`: its motion-interpolated
        copy (made with interpolate_fps); `thumbnail`: a PNG of the middle frame; `spritesheet`:
        the contact sheet."""
        file, media_type, name = await run_in_threadpool(self.service.content, video_id, variant)
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        return StreamingResponse(_chunks(file), media_type=media_type, headers=headers)

    @api.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=_ERRORS)
    async def delete_video(self, video_id: str):
        return await run_in_threadpool(self.service.delete, video_id)

    @api.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models(self):
        return self.service.models()


# ---- the application ------------------------------------------------------------------------


def app(args: ServeArgs) -> Application:
    """The application builder: `serve run serve_app:app model=tiny workers=2`, a Serve config
    file's `args`, or `framecast serve`. Checks the arguments before any deployment starts."""
    served = resolve_served(args)
    if not ray.is_initialized():  # `serve run` connects after building; the plan needs the cluster
        connect()
    resources = plan_deployments(served)
    encoder = Encoder.options(ray_actor_options=resources.encoder).bind("encode", served.model, served.weights)
    denoiser = DenoiserGroup.options(
        ray_actor_options=resources.denoiser,
        placement_group_bundles=resources.denoiser_bundles,
        placement_group_strategy="STRICT_PACK",
    ).bind(served.model, served.weights, served.layout, resources.rank)
    decoder = Decoder.options(num_replicas=served.decoders, ray_actor_options=resources.decoder).bind(
        "decode", served.model, served.weights
    )
    ingress = {"num_cpus": 0, "resources": dict(served.ingress_resources)}
    return VideosAPI.options(ray_actor_options=ingress).bind(encoder, denoiser, decoder, served)
