"""The device pool of LoRA adapters: ``max_loras`` slots (1..max_loras; slot 0 is the base model) on every
projection of a dense decoder that PEFT adapts (q, k, v, o, gate, up, down).

Each packed projection of P parts (qkv: 3, gate/up: 2, o and down: 1) holds ``lora_a`` [S, P*R, K] and ``lora_b``
[S, N, P*R], a view of [N, S, P*R] storage (R = ``max_lora_rank``, K and N this rank's input and output sizes):
part p's A in rows p*R.., its B in its output rows and columns p*R.. (block-diagonal, so one shrink and one expand
serve all parts, and zeros add nothing); every projection shares ``lora_scaling`` [S] float32.  Over plain weights
``lora_a`` is the last rows of a ``lora_fold`` whose top rows are the weight (zeros between, to a multiple of
``FOLD_ROWS``; ``lora_fold_rows``: (N, A's first row)), so one product can make the shrinks beside the base outputs.
``kernels/lora`` adds them; ``models/tensor_parallel.matmul`` calls it.  Under tensor parallelism a rank's B rows are
its output rows (column-parallel projections) and its A columns its input columns (row-parallel ones).
``write(slot, adapter)`` fills a slot from a ``peft.Adapter`` (modules it does not adapt: zeros); ``clear`` empties
one.  The pool is allocated before the KV cache is sized, so it lives inside ``gpu_memory_utilization``.
"""
import torch

import nanovllm.distributed as distributed
from nanovllm.models import tensor_parallel as tp
from nanovllm.quant import held

# the families whose layers pass ``lora_slots`` to packed q/k/v, o, gate/up and down projections (the shared
# decoder's, ``models/decoder.py``, and Gemma 3's) with a dense MLP, and whose loader writes the checkpoint's weights
# unchanged (MiniCPM folds scalings into them: its adapters would need the same)
FAMILIES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM")


FOLD_ROWS = 128  # a stacked weight's rows are a multiple of this (cuBLAS's tile; measured in PERFORMANCE.md)


class LoraPool:
    def __init__(self, model, max_loras: int, max_rank: int):
        from nanovllm.models.decoder import MLP
        from nanovllm.models.gemma3 import GeluMLP
        name = type(model).__name__
        if name not in FAMILIES or not all(isinstance(layer.mlp, (MLP, GeluMLP)) for layer in model.model.layers):
            raise ValueError(f"enable_lora: {name} is not supported; LoRA adapters run on the dense families "
                             f"({', '.join(FAMILIES)})")
        weight = model.model.embed_tokens.weight
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, weight.dtype, weight.device
        self.scaling = torch.zeros(max_loras + 1, dtype=torch.float32, device=self.device)
        self.targets = []  # (layer index, projection, [(module, global row/column range, local offset)], column)
        a, rank = model.args, distributed.current().rank
        hd = a.head_dim
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q = (rank * attn.q_size, (rank + 1) * attn.q_size)
            first = tp.kv_heads(a.num_kv_heads)[1] * hd
            kv = (first, first + attn.kv_size)
            self._attach(i, attn.qkv_proj, [("q_proj", q, 0), ("k_proj", kv, attn.q_size),
                                            ("v_proj", kv, attn.q_size + attn.kv_size)], True)
            self._attach(i, attn.o_proj, [("o_proj", q, 0)], False)
            local = mlp.down_proj.in_features
            inter = (rank * local, (rank + 1) * local)
            self._attach(i, mlp.gate_up_proj, [("gate_proj", inter, 0), ("up_proj", inter, local)], True)
            self._attach(i, mlp.down_proj, [("down_proj", inter, 0)], False)
        q, kv = a.num_heads * hd, a.num_kv_heads * hd  # module -> (in, out) of the whole (unsplit) projection
        self.sizes = dict(q_proj=(a.hidden_size, q), k_proj=(a.hidden_size, kv), v_proj=(a.hidden_size, kv),
                          o_proj=(q, a.hidden_size), gate_proj=(a.hidden_size, a.intermediate_size),
                          up_proj=(a.hidden_size, a.intermediate_size), down_proj=(a.intermediate_size, a.hidden_size))

    def _attach(self, layer_idx: int, linear: torch.nn.Linear, parts: list, column: bool) -> None:
        s, r = self.max_loras + 1, self.max_rank
        p = len(parts)
        kw = dict(dtype=self.dtype, device=self.device)
        weight = linear.weight
        if held.format_of(linear) is None and weight.dtype == self.dtype:  # stack A under the base weight
            n = weight.shape[0]
            rows = -(-(n + s * p * r) // FOLD_ROWS) * FOLD_ROWS  # zero rows between the weight and A pad it
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
            for p, (module, (lo, hi), offset) in enumerate(parts):
                w = adapter.weights.get((layer, module))
                if w is None:
                    continue
                a, b = w[0].to(self.device, self.dtype), w[1].to(self.device, self.dtype)
                rank = a.shape[0]
                if column:  # every input, this rank's output rows
                    linear.lora_a[slot, p * r:p * r + rank] = a
                    linear.lora_b[slot, offset:offset + hi - lo, p * r:p * r + rank] = b[lo:hi]
                else:  # this rank's input columns, every output
                    linear.lora_a[slot, p * r:p * r + rank] = a[:, lo:hi]
                    linear.lora_b[slot, :, p * r:p * r + rank] = b
        self.scaling[slot] = float(adapter.scaling)
