"""Dummy weights: every parameter of a model drawn at random, deterministic under a seed (``load_format="dummy"``).

Norm weights are 1 and everything else is normal with std ``DUMMY_STD``, drawn on each parameter's device (or on a
given device and copied), the same on every run of one device type.  Under tensor parallelism each parameter has
its own stream, so replicated parameters agree across ranks.
"""
import zlib

import torch
from torch import nn

import nanovllm.distributed as distributed

DUMMY_STD = 0.02


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int, draw_device: torch.device | None = None, scheme=None) -> None:
    """Random weights drawn on each parameter's device (or on ``draw_device``, e.g. a GPU for a model built on
    the host, and copied), deterministic under ``seed``; a parameter left on the meta device (``moe.deferred_experts``)
    drawn piece by piece into ``scheme``'s held format (``QuantScheme.draw_held``) on the other parameters' device."""
    generators = {}
    home = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for name, param in list(model.named_parameters()):  # shared (tied) parameters are listed once
        if "norm" in name.rsplit(".", 2)[-2]:
            param.fill_(1.0)
            continue
        device = draw_device or (home if param.is_meta else param.device)
        if distributed.current().size > 1:  # each parameter its own stream: replicated ones agree across ranks
            generators[device] = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(
                name.encode()))
        elif device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        if param.is_meta:
            path, _, attr = name.rpartition(".")
            scheme.draw_held(name, model.get_submodule(path), attr, lambda shape, g=generators[device]: torch.empty(
                shape, dtype=param.dtype, device=device).normal_(0.0, DUMMY_STD, generator=g), home)
        elif device == param.device:
            param.normal_(0.0, DUMMY_STD, generator=generators[device])
        else:
            drawn = torch.empty_like(param, device=device).normal_(0.0, DUMMY_STD, generator=generators[device])
            param.copy_(drawn)
