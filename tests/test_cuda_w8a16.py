"""The contract of the few-row FP8 CUDA kernel (``nanovllm/kernels/cuda_w8a16.py``), on the CPU: which calls it
takes, that off CUDA none is ``usable`` (the Triton path keeps them), and that ``cuda._linear`` asks it before
Triton.  The kernel itself: tests/gpu."""
import pytest
import torch

from nanovllm.kernels import cuda_w8a16, weight_quant


def _weight(n, k, group):
    return weight_quant.quantize(torch.randn(n, k) / k ** 0.5, group)


def test_fits_takes_one_to_eight_rows_of_whole_chunks_and_groups_of_whole_chunks():
    w, s = _weight(32, 256, 128)
    for m in (1, 2, 8):
        assert cuda_w8a16.fits(torch.randn(m, 256, dtype=torch.bfloat16), w, s, 128)
    assert cuda_w8a16.fits(torch.randn(3, 256, dtype=torch.float16), *_weight(32, 256, 256), 256)  # one a row
    assert not cuda_w8a16.fits(torch.randn(9, 256, dtype=torch.bfloat16), w, s, 128)  # past 8 rows
    assert not cuda_w8a16.fits(torch.randn(2, 256), w, s, 128)  # float32: the twin's
    assert not cuda_w8a16.fits(torch.randn(2, 256, dtype=torch.bfloat16), w, s, 64)  # a group of half a chunk
    w2, s2 = _weight(32, 192, 192)
    assert not cuda_w8a16.fits(torch.randn(2, 192, dtype=torch.bfloat16), w2, s2, 192)  # K not whole chunks
    assert not cuda_w8a16.fits(torch.randn(2, 256, dtype=torch.bfloat16), w.float(), s, 128)  # not e4m3


def test_fits_wants_unit_column_strides_and_aligned_rows():
    w, s = _weight(32, 256, 128)
    wide = torch.randn(2, 512, dtype=torch.bfloat16)
    assert cuda_w8a16.fits(wide[:, :256], w, s, 128)  # a row stride of 512 elements
    assert not cuda_w8a16.fits(wide[:, ::2], w, s, 128)  # a column stride of 2
    assert not cuda_w8a16.fits(torch.randn(2, 256, dtype=torch.bfloat16), w.t().contiguous().t(), s, 128)


def test_nothing_is_usable_off_cuda():
    w, s = _weight(32, 256, 128)
    assert not cuda_w8a16.usable(torch.randn(1, 256, dtype=torch.bfloat16), w, s, 128)


def test_an_fp8_projection_goes_to_the_cuda_kernel_ahead_of_triton_where_it_is_usable(monkeypatch):
    """``cuda._linear``'s order for an FP8 weight: the CUDA kernel where ``usable`` (standing in for a GPU here),
    with the call's group and ``silu_mul``; without it, the Triton path (``test_fp8_matmul_kernel.py``)."""
    from nanovllm.kernels import cuda
    calls = []
    monkeypatch.setattr(cuda_w8a16, "usable", lambda x, w, s, g: True)
    monkeypatch.setattr(cuda_w8a16, "linear_w8a16_cuda",
                        lambda x, w, s, g, bias, silu: calls.append((tuple(x.shape), g, silu)) or "cuda")
    monkeypatch.setattr(cuda, "linear_triton", lambda *args, **kwargs: pytest.fail("Triton ran instead"))
    w, s = _weight(32, 256, 128)
    assert cuda._linear(torch.randn(2, 256, dtype=torch.bfloat16), w, None, True, s, 128, None) == "cuda"
    assert calls == [((2, 256), 128, True)]
