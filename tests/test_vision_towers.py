"""The Qwen2.5-VL and Qwen3-VL vision towers equal transformers' vision models (float32, atol 1e-5) on one call
with several images of different grid sizes, including grids whose windows do not tile them evenly; the HF
state dict loads strictly under the same names, and the checkpoint prefixes are declared on the tower classes."""
import pytest
import torch

from nanovllm.models.qwen25_vision import Qwen25VisionTower
from nanovllm.models.qwen3_vision import Qwen3VisionTower

ATOL = 1e-5
# 8x12: 2x3 whole windows; 16x8: 4x2; 4x4: one; 10x14: 5x7 merged tokens, edge windows of 1 row / 1 column;
# a two-frame grid checks that windows and segments stay within a frame.
MIXED = [[1, 8, 12], [1, 16, 8], [1, 4, 4]]
UNEVEN = [[1, 10, 14], [2, 6, 10], [1, 2, 2]]


def roughen(model: torch.nn.Module):
    """Norm weights away from 1 and biases away from 0, so a misplaced norm or bias would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.uniform_(0.8, 1.2) if name.endswith("weight") else p.uniform_(-0.1, 0.1)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)


def hf_qwen25():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    config = Qwen2_5_VLVisionConfig(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                    window_size=56, fullatt_block_indexes=[1, 3], hidden_act="silu")
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa").float().eval()
    roughen(model)
    return config, model


def hf_qwen3():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    config = Qwen3VLVisionConfig(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                                 patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                 num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
    torch.manual_seed(0)
    model = Qwen3VLVisionModel._from_config(config, attn_implementation="sdpa").float().eval()
    roughen(model)
    return config, model


def ours(tower_class, config, hf_model):
    tower = tower_class(config.to_dict()).float().eval()
    tower.load_state_dict(hf_model.state_dict(), strict=True)
    return tower


def inputs(config, grids):
    grid_thw = torch.tensor(grids, dtype=torch.long)
    patches = int(grid_thw.prod(-1).sum())
    width = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    return torch.randn(patches, width, generator=torch.Generator().manual_seed(1)), grid_thw


@pytest.fixture(scope="module")
def qwen25():
    config, hf = hf_qwen25()
    return config, hf, ours(Qwen25VisionTower, config, hf)


@pytest.fixture(scope="module")
def qwen3():
    config, hf = hf_qwen3()
    return config, hf, ours(Qwen3VisionTower, config, hf)


@pytest.mark.parametrize("grids", [MIXED, UNEVEN], ids=["mixed", "uneven_windows"])
def test_qwen25_tower_equals_transformers(qwen25, grids):
    config, hf, tower = qwen25
    pixels, grid_thw = inputs(config, grids)
    with torch.no_grad():
        want = hf(pixels, grid_thw).pooler_output
        got = tower(pixels, grid_thw)
    assert got.shape == (pixels.shape[0] // 4, 48)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_qwen25_windows_really_split_the_images(qwen25):
    """The fixture's window (2x2 merged tokens) is smaller than the images: windowed blocks differ from full ones,
    so the windowed path is what the parity test above checks."""
    config, hf, tower = qwen25
    pixels, grid_thw = inputs(config, MIXED)
    with torch.no_grad():
        windowed = tower(pixels, grid_thw)
        full, tower.full_attention = tower.full_attention, set(range(len(tower.blocks)))
        try:
            all_full = tower(pixels, grid_thw)
        finally:
            tower.full_attention = full
    assert (windowed - all_full).abs().max() > 1e-3


@pytest.mark.parametrize("grids", [MIXED, UNEVEN], ids=["mixed", "uneven"])
def test_qwen3_tower_and_deepstack_equal_transformers(qwen3, grids):
    config, hf, tower = qwen3
    pixels, grid_thw = inputs(config, grids)
    with torch.no_grad():
        out = hf(pixels, grid_thw)
        got, deepstack = tower(pixels, grid_thw)
    assert got.shape == (pixels.shape[0] // 4, 48)
    torch.testing.assert_close(got, out.pooler_output, atol=ATOL, rtol=0)
    assert len(deepstack) == len(out.deepstack_features) == 2
    for mine, theirs in zip(deepstack, out.deepstack_features):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tower_class", [Qwen25VisionTower, Qwen3VisionTower])
def test_checkpoint_keys_load_with_the_prefix_stripped(tower_class, qwen25, qwen3):
    config, hf, _ = qwen25 if tower_class is Qwen25VisionTower else qwen3
    assert tower_class.hf_prefixes == ("model.visual.", "visual.")
    for prefix in tower_class.hf_prefixes:
        checkpoint = {prefix + k: v for k, v in hf.state_dict().items()}
        tower = tower_class(config.to_dict())
        tower.load_state_dict({k[len(prefix):]: v for k, v in checkpoint.items()}, strict=True)
        assert set(tower.state_dict()) == set(hf.state_dict())


def test_missing_config_keys_take_transformers_defaults():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    small = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=16, out_hidden_size=24)
    for tower_class, config_class in [(Qwen25VisionTower, Qwen2_5_VLVisionConfig),
                                      (Qwen3VisionTower, Qwen3VLVisionConfig)]:
        hf_config = config_class(**small)
        mine = tower_class(dict(small)).state_dict()
        theirs = tower_class(hf_config.to_dict()).state_dict()
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert Qwen25VisionTower(dict(small, in_chans=1)).patch_embed.proj.in_channels == 1
