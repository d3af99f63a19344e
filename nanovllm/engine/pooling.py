"""Pooling a prefill step's final hidden states into embeddings (``LLM.embed``, ``/v1/embeddings``).

A pooling request (``Sequence.pooling``) is prefilled like any prompt, in the same steps and graphs, and samples
nothing.  Every step's outputs carry the final normed hidden states of its tokens (``step_outputs``); right after
a step with pooling rows is queued, ``launch`` reduces them on the device, in stream order: LAST takes the row of
the prompt's last token (in the step that computes it); MEAN adds each chunk's rows to a float32 sum kept on the
sequence (``pool_sum``) and divides by the prompt's length at its last chunk (a MEAN request takes no prefix-cache
hit, so every token is computed).  The vectors of the requests a step ends are copied to the host in the
background (``ScheduledBatch.pooled``); once the step is resolved, ``finish`` cuts each to its ``dimensions`` and
L2-normalises it when asked, in float32, and sets ``Sequence.embedding``.
"""
import numpy as np
import torch


def plan(batch) -> list | None:
    """(sequence, its first token row in the step, its tokens in the step, whether the step ends its prompt) of every
    pooling sequence of a prefill ``batch``, laid out as ``PrefillInputBuilder.build`` lays it out; None if none."""
    rows, offset = [], 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if seq.pooling is not None:
            rows.append((seq, offset, n, seq.num_computed_tokens + n == len(seq)))
        offset += n
    return rows or None


def launch(hidden: torch.Tensor, rows: list, pin_memory: bool) -> tuple | None:
    """Queue the reduction of ``rows`` (``plan``) over ``hidden`` [T, H] (a step's, read before another step may
    overwrite it); returns (the sequences whose prompt ends here, a host tensor [n, H] float32 their pooled vectors
    land in once the step's event has passed), or None when none ends here."""
    device = hidden.device
    ended, vectors = [], []
    last = [(seq, start + n - 1) for seq, start, n, final in rows if final and seq.pooling.pooling_type == "LAST"]
    if last:
        ended += [seq for seq, _ in last]
        vectors.append(hidden.index_select(0, _index([r for _, r in last], device)).float())
    mean = [(seq, start, n, final) for seq, start, n, final in rows if seq.pooling.pooling_type == "MEAN"]
    if mean:
        token_rows = np.concatenate([np.arange(start, start + n) for _, start, n, _ in mean])
        segments = np.repeat(np.arange(len(mean)), [n for _, _, n, _ in mean])
        sums = torch.zeros(len(mean), hidden.shape[1], dtype=torch.float32, device=device).index_add_(
            0, _index(segments, device), hidden.index_select(0, _index(token_rows, device)).float())
        finals = []
        for j, (seq, start, n, final) in enumerate(mean):
            if seq.pool_sum is not None:  # the sum of its earlier chunks
                sums[j] += seq.pool_sum
            seq.pool_sum = None if final else sums[j].clone()
            if final:
                finals.append(j)
                ended.append(seq)
        if finals:
            lengths = torch.tensor([len(mean[j][0]) for j in finals], dtype=torch.float32).to(device)
            vectors.append(sums[_index(finals, device)] / lengths[:, None])
    if not ended:
        return None
    pooled = torch.cat(vectors)
    host = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=pin_memory)
    host.copy_(pooled, non_blocking=True)
    return ended, host


def finish(pooled: tuple) -> None:
    """Set ``embedding`` on each sequence of a resolved step's ``pooled`` (``launch``) that was not aborted."""
    for seq, vector in zip(pooled[0], pooled[1].numpy()):
        if seq.finish_reason == "abort":
            continue
        p = seq.pooling
        vector = vector[:p.dimensions] if p.dimensions is not None else vector
        if p.normalize:  # as torch.nn.functional.normalize: a zero vector stays zero
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        seq.embedding = np.array(vector, dtype=np.float32)


def _index(values, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(device, non_blocking=True)
