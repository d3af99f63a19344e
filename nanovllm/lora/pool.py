"""The device pool of LoRA adapters: ``max_loras`` slots (1..max_loras; slot 0 is the base model) on every
projection PEFT adapts (q, k, v, o, gate, up, down) as the model declares them (``model.lora_targets()``).

Each projection of P parts (packed qkv: 3, gate/up: 2; o, down and Gemma 4's separate q, k, v: 1) holds ``lora_a``
[S, P*R, K] and ``lora_b`` [S, N, P*R], a view of [N, S, P*R] storage (R = ``max_lora_rank``, K and N this rank's
input and output sizes): part p's A in rows p*R.., its B in its output rows and columns p*R.. (block-diagonal, so one
shrink and one expand serve all parts, and zeros add nothing); every projection shares ``lora_scaling`` [S] float32.
Over plain weights ``lora_a`` is the last rows of a ``lora_fold`` whose top rows are the weight (zeros between, to a
multiple of ``FOLD_ROWS``; ``lora_fold_rows``: (N, A's first row)): one product can make the shrinks beside the base
outputs.  ``kernels/lora`` adds them; ``models/tensor_parallel.matmul`` calls it.  Under tensor parallelism a rank's B
rows are its output rows (column-parallel projections) and its A columns its input columns (row-parallel ones).
``write(slot, adapter)`` fills a slot from a ``peft.Adapter`` (modules it does not adapt: zeros; B times the
projection's output scale, MiniCPM's); ``clear`` empties one.  The pool lives inside ``gpu_memory_utilization``.
"""
import torch

from nanovllm.quant import held

# the families checked against transformers + PEFT; each declares its projections' parts, split and output scale
# (``model.lora_targets()``, ``models/lora_targets.py``): the shared decoder's (the VL models' language model too),
# Gemma 3's and 4's, MiniCPM's
FAMILIES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM",
            "Gemma4ForCausalLM", "MiniCPMForCausalLM", "MiniCPM4ForCausalLM", "Qwen2_5_VLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration")


FOLD_ROWS = 128  # a stacked weight's rows are a multiple of this (cuBLAS's tile; measured in PERFORMANCE.md)


def fold_rows(n: int, stacked: int) -> int:
    """Rows of a ``lora_fold``: ``n`` weight rows and ``stacked`` rows of A, zeros between to a multiple of
    ``FOLD_ROWS``."""
    return -(-(n + stacked) // FOLD_ROWS) * FOLD_ROWS


class LoraPool:
    def __init__(self, model, max_loras: int, max_rank: int):
        name = type(model).__name__
        if name not in FAMILIES:
            raise ValueError(f"enable_lora: {name} is not supported; LoRA adapters run on the dense families "
                             f"({', '.join(FAMILIES)})")
        layers = model.lora_targets()
        weight = model.model.embed_tokens.weight
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, weight.dtype, weight.device
        self.scaling = torch.zeros(max_loras + 1, dtype=torch.float32, device=self.device)
        # (layer index, projection, [(module, global row/column range, local offset, output scale)], column)
        self.targets = []
        self.sizes = {}  # (layer, module) -> (in, out) of the whole (unsplit) projection: ``peft.check_shapes``
        for i, targets in enumerate(layers):
            for t in targets:
                self._attach(i, t.linear, [(p.module, p.span, p.offset, t.scale) for p in t.parts], t.column)
                self.sizes.update({(i, p.module): p.size for p in t.parts})

    def _attach(self, layer_idx: int, linear: torch.nn.Linear, parts: list, column: bool) -> None:
        s, r = self.max_loras + 1, self.max_rank
        p = len(parts)
        kw = dict(dtype=self.dtype, device=self.device)
        weight = linear.weight
        if held.format_of(linear) is None and weight.dtype == self.dtype:  # stack A under the base weight
            n = weight.shape[0]
            rows = fold_rows(n, s * p * r)
            fold = torch.zeros(rows, weight.shape[1], **kw)
            fold[:n] = weight.detach()
            linear.weight = torch.nn.Parameter(fold[:n], requires_grad=False)
            linear.register_buffer("lora_fold", fold, persistent=False)
            linear.register_buffer("lora_a", fold[rows - s * p * r:].view(s, p * r, -1), persistent=False)
            linear.lora_fold_rows = (n, rows - s * p * r)  # where the base outputs end and ``lora_a`` starts
        else:  # quantized weights: the shrink is its own product
            linear.register_buffer("lora_a", torch.zeros(s, p * r, linear.in_features, **kw), persistent=False)
        b = torch.zeros(linear.out_features, s, p * r, **kw)  # slots side by side: ``kernels/lora/stacked.py``
        linear.register_buffer("lora_b", b.permute(1, 0, 2), persistent=False)
        linear.register_buffer("lora_scaling", self.scaling, persistent=False)
        self.targets.append((layer_idx, linear, parts, column))

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for _, linear, _, _ in self.targets:
            linear.lora_a[slot].zero_()
            linear.lora_b[slot].zero_()
        self.scaling[slot] = 0.0

    @torch.no_grad()
    def write(self, slot: int, adapter) -> None:
        """Slot ``slot`` (1..max_loras) holds ``adapter`` (a ``lora.peft.Adapter`` whose shapes ``sizes`` checked,
        ``peft.check_shapes``); a layer the model lacks is a ``ValueError`` naming it, and leaves the slot as it was."""
        assert 1 <= slot <= self.max_loras, slot
        layers = 1 + max(t[0] for t in self.targets)
        bad = sorted({layer for layer, _ in adapter.weights if layer >= layers})
        if bad:
            raise ValueError(f"LoRA adapter: layers {bad} are past this model's {layers} layers")
        self.clear(slot)
        r = self.max_rank
        for layer, linear, parts, column in self.targets:
            for p, (module, (lo, hi), offset, scale) in enumerate(parts):
                w = adapter.weights.get((layer, module))
                if w is None:
                    continue
                a, b = w[0].to(self.device, self.dtype), (w[1] * scale).to(self.device, self.dtype)
                rank = a.shape[0]
                if column:  # every input, this rank's output rows
                    linear.lora_a[slot, p * r:p * r + rank] = a
                    linear.lora_b[slot, offset:offset + hi - lo, p * r:p * r + rank] = b[lo:hi]
                else:  # this rank's input columns, every output
                    linear.lora_a[slot, p * r:p * r + rank] = a[:, lo:hi]
                    linear.lora_b[slot, :, p * r:p * r + rank] = b
        self.scaling[slot] = float(adapter.scaling)
