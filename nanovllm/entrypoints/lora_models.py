"""The server's LoRA adapters as models (``--enable-lora``), as vLLM serves them.

``lora_modules(items)``: ``--lora-modules``' items, each ``name=path`` or a JSON object ``{"name", "path"[,
"base_model_name"]}``, as ``(name, path, parent or None)``; ``ValueError`` naming a bad one.
``ServedLoras``: adapters by model name, each a ``LoRARequest`` whose id is given in order of registration (never
reused).  ``load`` registers one once the engine has checked that it loads and fits (``Engine.add_lora``: a 400
naming the problem; a name already served: 400); ``unload`` forgets one (unknown: 404; in use by running
sequences: 409, from ``Engine.remove_lora``).  ``cards``: ``/v1/models``' entries of the adapters (``parent``: the
base model's id, ``root``: the adapter's path).
"""
import itertools
import json

from pydantic import BaseModel, ConfigDict

from nanovllm.entrypoints.engine_loop import EngineDead
from nanovllm.entrypoints.errors import APIError, bad_request
from nanovllm.lora.request import LoRARequest


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; the name decides


def lora_modules(items) -> list[tuple[str, str, str | None]]:
    out = []
    for item in items or ():
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
            except ValueError as e:
                raise ValueError(f"--lora-modules item {item!r} is not JSON: {e}") from None
            extra = set(spec) - {"name", "path", "base_model_name"} if isinstance(spec, dict) else None
            if extra is None or extra or not all(isinstance(spec.get(k), str) and spec[k] for k in ("name", "path")):
                raise ValueError(f"--lora-modules item {item!r} must be name=path or a JSON object with \"name\" and "
                                 f"\"path\" (and optionally \"base_model_name\")")
            out.append((spec["name"], spec["path"], spec.get("base_model_name")))
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules item {item!r} must be name=path or a JSON object with \"name\" "
                                 f"and \"path\"")
            out.append((name, path, None))
    names = [name for name, _, _ in out]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--lora-modules names {name!r} twice")
    return out


class ServedLoras:
    def __init__(self, loop, base_name: str, modules=()):
        self.loop, self.base_name, self.modules = loop, base_name, list(modules)
        self.adapters: dict[str, LoRARequest] = {}
        self.parents: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._pending: set[str] = set()  # names whose load is under way

    async def load_modules(self) -> None:
        """Load ``--lora-modules`` (as the server starts); ``RuntimeError`` naming the first that fails."""
        for name, path, parent in self.modules:
            try:
                await self.load(name, path, parent)
            except APIError as e:
                raise RuntimeError(f"--lora-modules {name}={path}: {e.message}") from None

    async def load(self, name, path, parent: str | None = None) -> LoRARequest:
        for field, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value:
                raise bad_request(f"{field} must be a non-empty string, got {value!r}", field)
        if name == self.base_name or name in self.adapters or name in self._pending:
            raise bad_request(f"The lora adapter '{name}' has already been loaded (or names the base model).",
                              "lora_name")
        request = LoRARequest(name, next(self._ids), path)
        self._pending.add(name)
        try:
            error = await self._engine("load", request)
        finally:
            self._pending.discard(name)
        if error is not None:
            raise bad_request(f"LoRA adapter '{name}' at {path!r} cannot be loaded: {error}", "lora_path")
        self.adapters[name] = request
        self.parents[name] = parent or self.base_name
        return request

    async def unload(self, name) -> None:
        request = self.adapters.get(name)
        if request is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "model_not_found")
        error = await self._engine("remove", request.lora_int_id)
        if error is not None:
            raise APIError(409, f"LoRA adapter '{name}' cannot be unloaded now: {error}", "lora_name", "lora_in_use")
        if self.adapters.get(name) is request:
            del self.adapters[name]
            self.parents.pop(name, None)

    async def _engine(self, op: str, arg) -> str | None:
        try:
            return await self.loop.lora(op, arg)
        except EngineDead as e:
            raise APIError(503, str(e), None, "engine_dead") from None

    def cards(self, created: int) -> list[dict]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "nanovllm", "root": r.lora_path,
                 "parent": self.parents[name]} for name, r in self.adapters.items()]
