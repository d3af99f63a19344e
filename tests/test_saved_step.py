"""The compiled step saved in a compile-cache entry: loading it does no Dynamo trace, binds to the loading
process's module and tensors (never to copies saved with it), and a corrupt or unusable saved step is
rebuilt or traced again with one warning.  A toy step keeps this fast; test_compile_cache.py covers a model."""
import dataclasses
import functools
import hashlib
import json
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from nanovllm import distributed
from nanovllm.compile import cache, saved_step
from nanovllm.compile.cache import CompileCache
from nanovllm.platforms.cpu import CpuPlatform

pytestmark = pytest.mark.skipif(saved_step.aot_unsupported_reason() is not None,
                                reason=str(saved_step.aot_unsupported_reason()))


@dataclasses.dataclass
class ToyInputs:
    x: torch.Tensor  # [tokens, 8]
    slots: torch.Tensor  # [tokens]


def toy_run_step(model, caches, buffer, inputs):
    """Shaped like run_step: a module, a list of cache tensors written in place, a buffer updated in place."""
    y = model(inputs.x)
    caches[0].index_copy_(0, inputs.slots, y)
    buffer.add_(1)
    return y.sum(-1)


def _objects(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 8), [torch.zeros(16, 8)], torch.zeros(2, dtype=torch.int64)


def _inputs(n=5):
    return ToyInputs(torch.arange(n * 8, dtype=torch.float32).reshape(n, 8) / 10, torch.arange(n))


FIELDS = {"toy": "saved step"}


def _start(root, objects, caplog):
    """One start: (step, origin, nanovllm warnings, Dynamo graphs compiled) for the objects of this 'process'."""
    step = functools.partial(toy_run_step, *objects)
    store = CompileCache(FIELDS, root=root)
    graphs = counters["stats"]["unique_graphs"]
    nanovllm_logger = logging.getLogger("nanovllm")
    nanovllm_logger.addHandler(caplog.handler)
    caplog.clear()
    try:
        with store.activate(), torch.inference_mode():
            compiled, origin = saved_step.compiled_step(CpuPlatform(torch.device("cpu")), step, _inputs, store)
    finally:
        nanovllm_logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.name == "nanovllm" and r.levelno >= logging.WARNING]
    return compiled, origin, warnings, counters["stats"]["unique_graphs"] - graphs, store


def test_loaded_step_skips_dynamo_and_binds_to_this_process_objects(tmp_path, caplog):
    first = _objects(0)
    _, origin, warnings, graphs, _ = _start(tmp_path, first, caplog)
    assert (origin, warnings, graphs) == ("aot", [], 1)
    before = [t.clone() for t in (first[1][0], first[2])]

    second = _objects(1)  # other weights and other tensors, as in a new process
    compiled, origin, warnings, graphs, store = _start(tmp_path, second, caplog)
    assert (origin, warnings, graphs) == ("loaded", [], 0) and store.hit
    assert [torch.equal(a, b) for a, b in zip(before, (first[1][0], first[2]))] == [True, True]  # not touched
    assert second[2].tolist() == [1, 1]  # the warm-up call wrote this process's buffer
    model, caches, buffer = second
    for n in (3, 9):  # token counts other than the trace's: the count is symbolic
        with torch.inference_mode():  # inputs made as the engine makes them (a plain tensor fails a guard)
            inputs = _inputs(n)
            got = compiled(inputs)
            want = toy_run_step(model, [torch.zeros(16, 8)], torch.zeros(2, dtype=torch.int64), inputs)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(caches[0][:n], model(inputs.x))
    with torch.no_grad():
        model.weight.mul_(2)  # parameters are read at each call, not baked in at load
    with torch.inference_mode():
        torch.testing.assert_close(compiled(_inputs(4)), toy_run_step(model, [torch.zeros(16, 8)],
                                                                      torch.zeros(2, dtype=torch.int64), _inputs(4)))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="[Gg]uard"):  # refused, never recompiled
        compiled(ToyInputs(torch.zeros(4, 7), torch.arange(4)))


def test_corrupt_saved_step_is_discarded_with_one_warning_and_rebuilt(tmp_path, caplog):
    _start(tmp_path, _objects(0), caplog)
    store = CompileCache(FIELDS, root=tmp_path)
    step_file = store.entry / "step.bin"
    data = bytearray(step_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step_file.write_bytes(bytes(data))
    _, origin, warnings, graphs, _ = _start(tmp_path, _objects(1), caplog)
    assert origin == "aot" and graphs == 1
    assert len(warnings) == 1 and "corrupt" in warnings[0] and "step.bin" in warnings[0]
    _, origin, warnings, graphs, _ = _start(tmp_path, _objects(2), caplog)
    assert (origin, warnings, graphs) == ("loaded", [], 0)


def _replace_step(root, garbage: bytes) -> CompileCache:
    """Put ``garbage`` in the entry's step.bin, checksummed correctly, though torch cannot load it."""
    store = CompileCache(FIELDS, root=root)
    (store.entry / "step.bin").write_bytes(garbage)
    manifest = json.loads((store.entry / "manifest.json").read_text())
    manifest["step"] = {"size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    (store.entry / "manifest.json").write_text(json.dumps(manifest))
    return store


def test_unloadable_saved_step_is_traced_with_one_warning_and_dropped(tmp_path, caplog):
    _start(tmp_path, _objects(0), caplog)
    store = _replace_step(tmp_path, b"not a compiled function")
    objects = _objects(1)
    compiled, origin, warnings, graphs, _ = _start(tmp_path, objects, caplog)
    assert origin == "traced" and graphs == 1
    assert len(warnings) == 1 and "could not be used" in warnings[0]
    with torch.inference_mode():
        torch.testing.assert_close(compiled(_inputs(6)), toy_run_step(*objects, _inputs(6)))
    assert json.loads((store.entry / "manifest.json").read_text())["step"] is None
    _, origin, warnings, _, store = _start(tmp_path, _objects(2), caplog)  # not tried again
    assert (origin, warnings) == ("traced", []) and store.hit


def _no_aot(*args, **kwargs):
    raise RuntimeError("no ahead-of-time compile here")


@pytest.mark.parametrize("path", ["cold", "warm", "unloadable", "cache-off", "aot-fails"])
def test_every_path_meets_the_other_ranks_once_after_compiling_and_before_running(tmp_path, caplog, monkeypatch, path):
    if path in ("warm", "unloadable", "cache-off"):  # an entry with a saved step
        _start(tmp_path, _objects(0), caplog)
    if path == "unloadable":
        _replace_step(tmp_path, b"garbage")
    if path == "cache-off":
        monkeypatch.setenv("NANOVLLM_DISABLE_COMPILE_CACHE", "1")
    if path == "aot-fails":
        monkeypatch.setattr(saved_step, "aot_compile", _no_aot)
    objects = _objects(1)
    buffer = objects[2]
    meetings = []  # what the step's buffer (incremented by each run) held at each meeting, and the cache's agreement
    monkeypatch.setattr(saved_step.liveness, "meet", lambda activity: meetings.append((activity, buffer.tolist())))
    monkeypatch.setattr(distributed, "agree_min", lambda value, device=None: meetings.append(("agree", None)) or value)
    _, origin, _, _, _ = _start(tmp_path, objects, caplog)
    assert origin == {"cold": "aot", "warm": "loaded"}.get(path, "traced")
    # with the cache on, the ranks meet before they agree on their entries (what came before may take one longer)
    assert [a for a, _ in meetings[:-1]] == ([] if path == "cache-off" else [cache.AGREEMENT, "agree"]), meetings
    assert meetings[-1][1] == [0, 0] and meetings[-1][0] not in (cache.AGREEMENT, "agree"), meetings
    assert buffer.tolist() == [1, 1]  # one run, after the meeting
