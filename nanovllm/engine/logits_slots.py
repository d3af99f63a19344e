"""``LogitsSlots``: the host's side of ``LogitsState`` (``nanovllm/step/logits_state.py``), the per-token-slot rows
a processed step reads to apply penalties and grammar masks.

``prepare(seqs, pipeline_slot)``, before a processed step is launched:
* a sequence that is new to its token slot (just admitted, or readmitted after preemption, or never processed
  there before) gets its rows set: its penalties and whether it is masked, its prompt's tokens in ``seen``, its
  completion's tokens so far in ``counts`` (after a preemption the completion is recomputed, not forgotten), its
  ``logit_bias`` and, with ``min_tokens``, its stop tokens (EOS unless ``ignore_eos``, ``stop_token_ids``);
* each constrained sequence that samples in the step gets its bitmask row from its grammar, which has accepted
  every token of the sequence (the engine resolves a constrained sequence's tokens before scheduling it again).
Everything reaches the device through one pinned staging buffer per pipeline slot (reused only after its step
was collected, as ``StepPipeline`` guarantees), in copies queued on the step's stream, so the host never waits;
the masks' copies run beside the queued steps (``Platform.beside``), which read no row being filled but rows whose
tokens are thrown away.  A plain step never reads these rows: a request without either costs nothing here.
"""
import numpy as np
import torch

from nanovllm.sampling_params import LOGIT_BIAS_LIMIT
from nanovllm.step import LogitsState


class LogitsSlots:
    def __init__(self, state: LogitsState, platform, grammars, eos_token_ids=()):
        """``state``: the device rows; ``grammars``: the engine's ``Grammars`` (fills bitmask rows);
        ``eos_token_ids``: the tokens ``min_tokens`` holds back unless a request ignores EOS."""
        self.state, self.platform, self.grammars = state, platform, grammars
        self.eos_token_ids = tuple(eos_token_ids)
        self.device, self.pin_memory = platform.device, platform.pin_memory
        self.owner: list = [None] * state.params.shape[0]  # seq_id whose rows each slot holds
        self._ints: dict[int, torch.Tensor] = {}  # pipeline slot -> pinned int64 staging (-1 - slot: masks')
        self._floats: dict[int, torch.Tensor] = {}  # pipeline slot -> pinned float32 staging
        self._masks: dict[int, torch.Tensor] = {}  # pipeline slot -> pinned int32 bitmask staging
        self._bias: dict[tuple, torch.Tensor] = {}  # (pipeline slot, part) -> pinned staging of the bias rows

    def _staging(self, store: dict, key: int, shape: tuple, dtype) -> torch.Tensor:
        buf = store.get(key)
        if buf is None or buf.shape[0] < shape[0]:  # first made for every token slot: pinning costs milliseconds
            rows = max(shape[0], 2 * (buf.shape[0] if buf is not None else 0), self.state.params.shape[0])
            buf = store[key] = torch.empty((rows, *shape[1:]), dtype=dtype, pin_memory=self.pin_memory)
        return buf

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host if host.device == self.device else host.to(self.device, non_blocking=True)

    def prepare(self, seqs: list, sampling: list[bool], pipeline_slot: int) -> None:
        """Set the rows of ``seqs`` (those of a processed step) as the module docstring says; ``sampling[i]``:
        whether the step samples ``seqs[i]``'s next token."""
        fresh = [s for s in seqs if s.token_slot is not None and self.owner[s.token_slot] != s.seq_id]
        if fresh:
            self._initialise(fresh, pipeline_slot)
        masked = [s for s, samples in zip(seqs, sampling)  # (a sequence the step's row outlived has no slot)
                  if samples and s.grammar is not None and s.token_slot is not None]
        if masked:
            self._fill_masks(masked, pipeline_slot)

    def _initialise(self, seqs: list, pipeline_slot: int) -> None:
        n = len(seqs)
        params = self._staging(self._floats, pipeline_slot, (n, 4), torch.float32)[:n]
        p = params.numpy()
        seen_rows, seen_ids, count_rows, count_ids = [], [], [], []
        for i, seq in enumerate(seqs):
            sp = seq.params
            p[i] = (seq.grammar is not None, sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty)
            self.owner[seq.token_slot] = seq.seq_id
            if sp.repetition_penalty != 1:
                prompt = np.unique(np.asarray(seq.token_ids[:seq.num_prompt_tokens], np.int64))
                seen_rows.append(np.full(len(prompt), seq.token_slot))
                seen_ids.append(prompt)
            if sp.has_penalties:
                done = np.asarray(seq.token_ids[seq.num_prompt_tokens:seq.num_resolved_tokens], np.int64)
                count_rows.append(np.full(len(done), seq.token_slot))
                count_ids.append(done)
        parts = [np.asarray([s.token_slot for s in seqs], np.int64)] + [
            np.concatenate(a) if a else np.zeros(0, np.int64) for a in (seen_rows, seen_ids, count_rows, count_ids)]
        sizes = [len(a) for a in parts]
        ints = self._staging(self._ints, pipeline_slot, (sum(sizes),), torch.int64)[:sum(sizes)]
        ints.numpy()[:] = np.concatenate(parts)
        slots, seen_rows, seen_ids, count_rows, count_ids = torch.split(self._to_device(ints), sizes)
        state = self.state
        state.params.index_copy_(0, slots, self._to_device(params))
        state.counts.index_fill_(0, slots, 0)
        state.seen.index_fill_(0, slots, False)
        state.seen.index_put_((seen_rows, seen_ids), torch.ones_like(seen_ids, dtype=torch.bool))
        state.counts.index_put_((count_rows, count_ids), torch.ones_like(count_ids, dtype=state.counts.dtype),
                                accumulate=True)
        self._initialise_bias(seqs, slots, pipeline_slot)

    def bias_entries(self, seq) -> tuple[list, list, list]:
        """(token ids, biases, held) of ``seq``'s bias row: its ``logit_bias`` (clamped to [-100, 100]), then, with
        ``min_tokens``, its stop tokens inside the vocabulary (bias 0, held)."""
        sp, vocab = seq.params, self.state.counts.shape[1]
        ids = list(sp.logit_bias or ())
        bias = [max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(sp.logit_bias[t]))) for t in ids]
        if sp.min_tokens > 0:
            stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_token_ids))
            held = sorted(t for t in stops if 0 <= t < vocab)
            ids, bias = ids + held, bias + [0.0] * len(held)
        return ids, bias, [False] * len(sp.logit_bias or ()) + [True] * (len(ids) - len(sp.logit_bias or ()))

    def _initialise_bias(self, seqs: list, slots: torch.Tensor, pipeline_slot: int) -> None:
        n, width = len(seqs), self.state.bias_ids.shape[1]
        ids = self._staging(self._bias, (pipeline_slot, "ids"), (n, width), torch.int64)[:n]
        bias = self._staging(self._bias, (pipeline_slot, "bias"), (n, width), torch.float32)[:n]
        held = self._staging(self._bias, (pipeline_slot, "held"), (n, width), torch.bool)[:n]
        min_len = self._staging(self._bias, (pipeline_slot, "min_len"), (n,), torch.int64)[:n]
        ids.zero_(), bias.zero_(), held.zero_()
        for i, seq in enumerate(seqs):
            row_ids, row_bias, row_held = self.bias_entries(seq)
            if len(row_ids) > width:
                raise ValueError(f"request {seq.seq_id} biases {len(row_ids)} tokens; at most {width}")
            k = len(row_ids)
            ids[i, :k], bias[i, :k], held[i, :k] = (torch.tensor(v) for v in (row_ids, row_bias, row_held))
            min_len[i] = seq.num_prompt_tokens + seq.params.min_tokens
        state = self.state
        for target, host in ((state.bias_ids, ids), (state.bias, bias), (state.held, held), (state.min_len, min_len)):
            target.index_copy_(0, slots, self._to_device(host))

    def _fill_masks(self, seqs: list, pipeline_slot: int) -> None:
        n, words = len(seqs), self.state.bitmask.shape[1]
        host = self._staging(self._masks, pipeline_slot, (n, words), torch.int32)[:n]
        self.grammars.fill([s.grammar for s in seqs], host)
        ints = self._staging(self._ints, -1 - pipeline_slot, (n,), torch.int64)[:n]
        ints.numpy()[:] = [s.token_slot for s in seqs]
        with self.platform.beside():  # the rows of queued steps' live sequences are not these (module docstring)
            self.state.bitmask.index_copy_(0, self._to_device(ints), self._to_device(host))
