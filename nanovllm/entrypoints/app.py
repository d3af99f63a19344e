"""The FastAPI application: routes, the API key and the OpenAI error shape.

Routes: ``GET /v1/models`` (the base model and its LoRA adapters), ``POST /v1/completions``, ``POST
/v1/chat/completions``, ``POST /v1/embeddings`` (``embeddings.py``), ``POST /v1/score`` and ``/score``, ``POST
/v1/rerank``, ``/rerank`` and ``/v2/rerank`` (``score.py``), Anthropic's ``POST /v1/messages`` (``messages.py``),
with ``--enable-lora`` vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (``lora_models.py``),
``POST /tokenize`` and ``/detokenize`` (``tokenize.py``; behind the API key when one is set: ``Authorization: Bearer
KEY``, for /v1/messages also ``x-api-key: KEY``, else 401), and, always open, ``GET /health`` (503 once the engine
has failed), ``GET /version`` and ``GET /metrics`` (Prometheus text).  Every error is ``{"error": {"message",
"type", "param", "code"}}`` (on /v1/messages Anthropic's ``{"type": "error", "error": {"type", "message"}}``): a
body that fails validation is a 400 naming the field and the value (a field the request models do not declare: a
400 naming it, ``fields.unknown_field``), an unknown route a 404; the server stays up after all of them.  The engine
loop starts and stops with the application (its lifespan), which loads ``--lora-modules`` before the port opens.
"""
import hmac
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from nanovllm.entrypoints.chat import create_chat_completion
from nanovllm.entrypoints.completions import create_completion
from nanovllm.entrypoints.embeddings import EmbeddingRequest, create_embedding
from nanovllm.entrypoints.fields import unknown_field
from nanovllm.entrypoints.lora_models import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from nanovllm.entrypoints.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from nanovllm.entrypoints.messages import create_message
from nanovllm.entrypoints.metrics import CONTENT_TYPE
from nanovllm.entrypoints.protocol import APIError, ChatRequest, CompletionRequest
from nanovllm.entrypoints.protocol_messages import MessagesRequest, error_body
from nanovllm.entrypoints.score import RerankRequest, ScoreRequest, create_rerank, create_score
from nanovllm.entrypoints.serving import Serving
from nanovllm.logger import logger
from nanovllm.version import __version__

MESSAGES = "/v1/messages"  # Anthropic's route: its own error shape and API-key header


def build_app(serving: Serving, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        serving.loop.start()
        try:
            if serving.loras is not None:
                await serving.loras.load_modules()
        except BaseException:
            serving.loop.shutdown()
            serving.batch_tokenizer.close()
            raise
        yield
        serving.loop.shutdown()
        serving.batch_tokenizer.close()

    app = FastAPI(title="nanovllm", version=__version__, lifespan=lifespan)

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if request.url.path == MESSAGES and "x-api-key" in request.headers:  # Anthropic's header
            given = f"Bearer {request.headers['x-api-key']}"
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>`.",
                           None, "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{
            "id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "nanovllm",
            "root": serving.prompts.model, "max_model_len": serving.max_model_len},
            *(serving.loras.cards(serving.created) if serving.loras is not None else ())]}

    if serving.loras is not None:  # vLLM's run-time adapter routes, on with --enable-lora
        @v1.post("/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest):
            await serving.loras.load(body.lora_name, body.lora_path)
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

        @v1.post("/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
            await serving.loras.unload(body.lora_name)
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                            media_type="text/plain")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(serving, body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await create_chat_completion(serving, body, request)

    @v1.post("/messages")
    async def messages(body: MessagesRequest, request: Request):
        return await create_message(serving, body, request)

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        return await create_embedding(serving, body, request)

    for path in ("/v1/score", "/score"):
        @app.post(path, dependencies=[Depends(check_api_key)])
        async def score(body: ScoreRequest, request: Request):
            return await create_score(serving, body, request)

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        @app.post(path, dependencies=[Depends(check_api_key)])
        async def rerank(body: RerankRequest, request: Request):
            return await create_rerank(serving, body, request)

    @app.post("/tokenize", dependencies=[Depends(check_api_key)])
    async def tokenize_route(body: TokenizeRequest):
        return await tokenize(serving, body)

    @app.post("/detokenize", dependencies=[Depends(check_api_key)])
    async def detokenize_route(body: DetokenizeRequest):
        return await detokenize(serving, body)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if serving.loop.error is not None:
            return JSONResponse(APIError(503, f"the engine failed: {serving.loop.error!r}").body(), 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        return _error(request, _validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return _error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        logger.exception("request %s failed", request.url.path)
        return _error(request, APIError(500, f"internal error: {e!r}"))

    return app


def _error(request, e: APIError) -> JSONResponse:
    """The error in the shape of the request's API: Anthropic's on /v1/messages, OpenAI's elsewhere."""
    return JSONResponse(error_body(e) if request.url.path == MESSAGES else e.body(), status_code=e.status)


def _validation_error(e: RequestValidationError) -> APIError:
    """A 400 naming the first field that failed and the value it got."""
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}")
    # a union (prompt, stop, content) reports one error per member type: name the field, not the member
    members = {"str", "list[str]", "list[int]", "list[list[int]]", "int", "float", "bool"}
    param = ".".join(x for x in loc if x not in members and not x.startswith(("function-", "list[", "dict[")))
    if first.get("type") == "extra_forbidden":
        message, param = unknown_field(loc, first.get("input"))
        return APIError(400, message, param)
    message = f"{param or 'body'}: {first.get('msg')}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {first['input']!r})"
    return APIError(400, message, param or None)
