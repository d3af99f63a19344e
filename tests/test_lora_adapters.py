"""nanovllm/lora on the CPU: LoRARequest, read_adapter against peft's own saved adapters, and SlotManager."""
import json
import math

import pytest
import torch

from nanovllm.lora.peft import Adapter, check_shapes, read_adapter
from nanovllm.lora.request import LoRARequest
from nanovllm.lora.slots import SlotManager

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (in, out) of each projection of the tiny model: hidden 64, 4 heads and 2 kv heads of 32, intermediate 128
SIZES = {"q_proj": (64, 128), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (128, 64),
         "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def tiny_model():
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def save_adapter(directory, r=8, alpha=16, targets=ATTN + MLP, **kw):
    """Save a peft LoRA adapter of the tiny model (nonzero B) to ``directory``; its in-memory state dict."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)
    model = peft.get_peft_model(tiny_model(), config)
    model.save_pretrained(str(directory))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("a8")
    return d, save_adapter(d)


def test_lora_request_is_vllms_and_exported():
    import nanovllm
    req = nanovllm.LoRARequest("sql", 3, "/some/dir")
    assert nanovllm.LoRARequest is LoRARequest and "LoRARequest" in nanovllm.__all__
    assert (req.name, req.adapter_id, req.path) == ("sql", 3, "/some/dir")
    assert LoRARequest(lora_name="a", lora_int_id=1).lora_path == ""
    assert req == LoRARequest("sql", 3, "/other") and hash(req) == hash(LoRARequest("sql", 9))
    for bad in (0, -1, 1.0, "2", True):
        with pytest.raises(ValueError, match="lora_int_id"):
            LoRARequest("x", bad, "/d")


@pytest.mark.parametrize("r,alpha,targets,rslora", [(8, 16, ATTN + MLP, False), (16, 32, ["q_proj", "v_proj"], False),
                                                    (16, 8, MLP, True)])
def test_read_adapter_gives_peft_tensors_and_scaling(tmp_path, r, alpha, targets, rslora):
    state = save_adapter(tmp_path, r=r, alpha=alpha, targets=targets, use_rslora=rslora)
    adapter = read_adapter(tmp_path, max_rank=16)
    assert adapter.rank == r
    assert adapter.scaling == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
    assert set(adapter.weights) == {(layer, m) for layer in range(2) for m in targets}
    for (layer, m), (a, b) in adapter.weights.items():
        parent = "self_attn" if m in ATTN else "mlp"
        key = f"base_model.model.model.layers.{layer}.{parent}.{m}.lora_%s.default.weight"
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, state[key % "A"].float()) and torch.equal(b, state[key % "B"].float())
        assert b.abs().sum() > 0 and tuple(a.shape) == (r, SIZES[m][0]) and tuple(b.shape) == (SIZES[m][1], r)
    check_shapes(adapter, SIZES)
    assert read_adapter(tmp_path, 16, dtype=torch.bfloat16).weights[(0, targets[0])][0].dtype == torch.bfloat16


def test_names_without_prefix_and_bin_files(tmp_path, adapter_dir):
    from safetensors.torch import load_file, save_file
    src, _ = adapter_dir
    tensors = load_file(str(src / "adapter_model.safetensors"))
    want = read_adapter(src, 8).weights
    for name, write in (("st", lambda d, t: save_file(t, str(d / "adapter_model.safetensors"))),
                        ("bin", lambda d, t: torch.save(t, str(d / "adapter_model.bin")))):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        write(d, {k.removeprefix("base_model.model."): v for k, v in tensors.items()})
        got = read_adapter(d, 8).weights
        assert got.keys() == want.keys() and all(torch.equal(got[k][1], want[k][1]) for k in want)


def test_a_multimodal_models_language_model_names(tmp_path, adapter_dir):
    """An adapter of a published multimodal checkpoint names its decoder ``model.language_model.layers``."""
    from safetensors.torch import load_file, save_file
    src, _ = adapter_dir
    tensors = load_file(str(src / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file({k.replace("model.layers.", "model.language_model.layers."): v for k, v in tensors.items()},
              str(tmp_path / "adapter_model.safetensors"))
    want, got = read_adapter(src, 8).weights, read_adapter(tmp_path, 8).weights
    assert got.keys() == want.keys() and all(torch.equal(got[k][0], want[k][0]) for k in want)


def test_check_shapes_names_the_module(adapter_dir):
    adapter = read_adapter(adapter_dir[0], 8)
    with pytest.raises(ValueError, match="down_proj"):
        check_shapes(adapter, {**SIZES, "down_proj": (256, 64)})
    with pytest.raises(ValueError, match="gate_proj"):
        check_shapes(adapter, {k: v for k, v in SIZES.items() if k != "gate_proj"})
    per_layer = {(layer, m): size for layer in range(2) for m, size in SIZES.items()}  # the pool's ``sizes``
    check_shapes(adapter, per_layer)
    with pytest.raises(ValueError, match=r"down_proj \(layer 1\)"):
        check_shapes(adapter, {**per_layer, (1, "down_proj"): (256, 64)})


def copy_adapter(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("change,match", [
    ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
    ({"r": 32}, "rank 32 is above max_lora_rank=16"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["score"]}, "modules_to_save.*score"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"target_modules": ["lm_head"]}, "lm_head"),
    ({"target_modules": ["q_proj", "qkv_proj"]}, "qkv_proj"),
    ({"bias": "lora_only"}, "lora_only"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"r": 4}, r"lora_A.weight. has shape \[8, \d+\].*r=4"),
])
def test_refusals_name_the_value(tmp_path, adapter_dir, change, match):
    d = copy_adapter(adapter_dir[0], tmp_path / "bad")
    edit_config(d, **change)
    with pytest.raises(ValueError, match=match):
        read_adapter(d, max_rank=16)


def test_refused_tensors_and_missing_files(tmp_path, adapter_dir):
    from safetensors.torch import load_file, save_file
    with pytest.raises(ValueError, match="nowhere"):
        read_adapter(tmp_path / "nowhere", 16)
    d = copy_adapter(adapter_dir[0], tmp_path / "noconfig")
    (d / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        read_adapter(d, 16)
    d = copy_adapter(adapter_dir[0], tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        read_adapter(d, 16)
    tensors = load_file(str(adapter_dir[0] / "adapter_model.safetensors"))
    extra = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 384),
             "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64),
             "base_model.model.model.layers.0.mlp.fc1.lora_A.weight": torch.zeros(8, 64)}
    for i, (name, t) in enumerate(extra.items()):
        d = copy_adapter(adapter_dir[0], tmp_path / f"extra{i}")
        save_file({**tensors, name: t}, str(d / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=name.split(".")[-2] if i < 2 else "fc1"):
            read_adapter(d, 16)
    d = copy_adapter(adapter_dir[0], tmp_path / "noB")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj.lora_B" not in k},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="layer 1 up_proj has no lora_B"):
        read_adapter(d, 16)


# --- SlotManager ---------------------------------------------------------------------------------------------

class Loader:
    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, req):
        self.calls.append(req.lora_int_id)
        if req.lora_int_id in self.fail:
            raise FileNotFoundError("no such adapter")
        return Adapter(rank=4, scaling=float(req.lora_int_id), weights={})


def req(i):
    return LoRARequest(f"a{i}", i, f"/adapters/{i}")


def test_slots_fill_then_evict_least_recently_used():
    load = Loader()
    m = SlotManager(max_loras=2, max_cpu_loras=4, load=load)
    s1, a1 = m.acquire(req(1))
    s2, a2 = m.acquire(req(2))
    assert (s1, s2) == (1, 2) and a1.scaling == 1.0 and a2.scaling == 2.0
    assert m.acquire(req(1)) == (1, None) and m.pins(1) == 2
    for _ in range(2):
        m.release(1)
    m.release(2)
    m.acquire(req(1)), m.release(1)  # 2 is now the least recently used
    slot, adapter = m.acquire(req(3))
    assert slot == 2 and adapter.scaling == 3.0
    assert m.slot_of(2) is None and m.slot_of(3) == 2 and m.slot_of(1) == 1
    m.release(2)
    assert m.acquire(req(2))[0] == 1  # 1 is now the least recently used
    assert load.calls == [1, 2, 3]  # 2 came back from the host cache
    assert m.loaded_ids() == [1, 2, 3]


def test_all_pinned_waits_until_a_release():
    m = SlotManager(2, 4, Loader())
    m.acquire(req(1)), m.acquire(req(2))
    assert m.acquire(req(3)) is None and m.slot_of(3) is None
    assert m.acquire(req(2)) == (2, None)  # an adapter already in a slot still gets it
    m.release(1)
    assert m.acquire(req(3))[0] == 1
    m.release(2), m.release(2)
    with pytest.raises(ValueError, match="slot 2 is not pinned"):
        m.release(2)
    with pytest.raises(ValueError, match="slot 0"):
        m.release(0)


def test_host_cache_is_bounded_lru_and_reused():
    load = Loader()
    m = SlotManager(1, 2, load)
    for i in (1, 2, 1, 3):  # each acquire evicts the previous one from the single slot
        m.release(m.acquire(req(i))[0])
    assert load.calls == [1, 2, 3] and m.cached_ids() == [1, 3]  # 2 was least recently used
    m.release(m.acquire(req(2))[0])
    assert load.calls == [1, 2, 3, 2] and m.cached_ids() == [3, 2]
    m.release(m.acquire(req(3))[0])
    assert load.calls == [1, 2, 3, 2]


def test_remove():
    m = SlotManager(2, 1, Loader())
    m.acquire(req(1)), m.acquire(req(2))  # 1 leaves the host cache but keeps its slot
    assert m.cached_ids() == [2] and m.slot_of(1) == 1
    with pytest.raises(ValueError, match="adapter 1 is in use"):
        m.remove(1)
    m.release(1)
    assert m.remove(1) == 1 and m.slot_of(1) is None and m.loaded_ids() == [2]
    assert m.remove(1) is None and m.remove(7) is None
    assert m.acquire(req(3))[0] == 1  # the freed slot


def test_failing_load_keeps_state_consistent():
    load = Loader(fail={2})
    m = SlotManager(1, 2, load)
    m.release(m.acquire(req(1))[0])
    with pytest.raises(ValueError, match=r"'a2'.*/adapters/2"):
        m.acquire(req(2))
    assert m.slot_of(1) == 1 and m.slot_of(2) is None and m.loaded_ids() == [1] and m.pins(1) == 0
    assert m.acquire(req(1)) == (1, None)
    load.fail.clear()
    m.release(1)
    assert m.acquire(req(2))[0] == 1 and m.loaded_ids() == [1, 2]


def test_reading_through_the_slot_manager(adapter_dir):
    m = SlotManager(2, 2, lambda r: read_adapter(r.lora_path, max_rank=8))
    slot, adapter = m.acquire(LoRARequest("tiny", 5, str(adapter_dir[0])))
    assert slot == 1 and adapter.rank == 8
    with pytest.raises(ValueError, match="'missing'.*/nope"):
        m.acquire(LoRARequest("missing", 6, "/nope"))
