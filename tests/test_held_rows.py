"""``quant/held.keep_rows``: a projection keeps some of its output rows in the format it holds them (plain, FP8 with
a scale per row and group, int4 with scales, zeros and an act-order permutation), and its output is then exactly
those rows of the whole projection's; a format without rows (MXFP4 stacked experts) is refused by name."""
import pytest
import torch
from torch import nn

from nanovllm.kernels import int4_quant
from nanovllm.quant import fp8_weights, held, int4_weights

ROWS = torch.tensor([1, 2, 5, 6, 7, 11])  # not one contiguous run


class One(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(64, 12, bias=False)

    def quant_targets(self):
        return {"proj.weight": (self.proj, "weight", False)}


def as_plain(module):
    return module


def as_fp8(module):
    fp8_weights.quantize_online(module, group=32)  # two groups of columns: scales [12, 2]
    return module


def as_int4(module):
    proj = module.proj
    qweight, scale, zero = int4_quant.quantize(proj.weight.detach(), 16, True)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))  # act order: every row keeps it
    int4_weights.hold(proj, "weight", qweight, scale, zero, 16, perm)
    return module


@pytest.mark.parametrize("make", [as_plain, as_fp8, as_int4], ids=["plain", "fp8", "int4"])
def test_kept_rows_give_those_rows_of_the_whole_output(make):
    proj = make(One()).proj
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    whole = held.linear(proj, x, None)
    held.keep_rows(proj, ROWS)
    assert proj.weight.shape[0] == len(ROWS) and not proj.weight.requires_grad
    if held.format_of(proj) is not None:
        assert proj.weight_scale.shape[0] == len(ROWS) and "weight_scale" in dict(proj.named_buffers())
    # the same products (a BLAS call over fewer rows may sum in another order: float32 rounding apart)
    torch.testing.assert_close(held.linear(proj, x, None), whole[:, ROWS], rtol=1e-5, atol=1e-6)


def test_stacked_mxfp4_experts_have_no_rows_to_keep():
    module = nn.Linear(64, 12, bias=False)
    module.weight_format = held.MXFP4
    with pytest.raises(ValueError, match="mxfp4 weights have no rows to keep"):
        held.keep_rows(module, ROWS)
