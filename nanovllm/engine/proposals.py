"""``propose``: the proposals a decode step verifies under speculative decoding (``nanovllm/speculative.py``).

A step verifies only when every sequence in it has all its tokens resolved and none asks for logprobs, penalties,
top-k/top-p or a grammar (those steps run plain, one token each), and some sequence has a proposal.  A proposal
never reaches past the request's ``max_tokens`` or ``max_model_len``, and takes further KV blocks only while free
ones last, in the full pool and a window pool (its limit is cut to the room its blocks have, never preempting
anyone).  The blocks are taken before proposing, since a draft model (``drafter.py``) writes its own KV at those
positions.  The proposer is the n-gram ``SpeculativeConfig`` or a ``Drafter``: anything with
``propose_all(seqs, limits)``.  ``resolve_verify`` takes a resolved verify step's accepted tokens in.
"""
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from nanovllm.speculative import accept


def propose(seqs: list[Sequence], proposer, block_manager: BlockManager, max_model_len: int
            ) -> list[list[int]] | None:
    """Per sequence of a decode step, its proposal (blocks appended for it), or None: a plain step."""
    if proposer is None or any(
            s.token_ids[-1] == PENDING_TOKEN or s.logprobs is not None or s.grammar is not None
            or s.params.needs_processing or s.params.needs_filter for s in seqs):
        return None
    bm, limits = block_manager, []
    for seq in seqs:
        room = min(seq.params.max_tokens - (len(seq) - seq.num_prompt_tokens), max_model_len - len(seq)) - 1
        limit = max(0, min(proposer.num_speculative_tokens, room))
        while len(seq.block_table) * bm.block_size < len(seq) + limit:
            if bm.num_free_blocks == 0:
                limit = len(seq.block_table) * bm.block_size - len(seq)
                break
            bm.append_block(seq)
        limit = min(limit, bm.window_reach(seq, len(seq) - 1) - len(seq))  # and window blocks, while they last
        bm.reserve_window(seq, len(seq) - 1, len(seq) + limit)
        limits.append(limit)
    if not any(limits):
        return None
    proposals = [p[:limit] for p, limit in zip(proposer.propose_all(seqs, limits), limits)]
    return proposals if any(proposals) else None


def resolve_verify(scheduler, batch, drawn: list[int]) -> list[Sequence]:
    """Add each sequence's accepted tokens (``speculative.accept``) up to a stop; finish on a stop or length.
    The KV of rejected proposals lies past ``num_computed_tokens``, to be overwritten."""
    finished, row, bm = [], 0, scheduler.block_manager
    for i, (seq, proposal) in enumerate(zip(batch.seqs, batch.proposals)):
        tokens = accept(proposal, drawn[row:row + len(proposal) + 1])
        row += len(proposal) + 1
        batch.accepted.append(len(tokens) - 1)
        if seq.status is SequenceStatus.FINISHED:  # aborted since
            continue
        for token in tokens:
            seq.token_ids.append(token)
            seq.num_computed_tokens += 1
            ends = len(seq) - seq.num_prompt_tokens >= seq.params.max_tokens or len(seq) >= scheduler.max_model_len
            stops = scheduler.stops_on(seq, token, len(seq) - 1)
            if stops or ends:
                scheduler.finish(seq, "stop" if stops else "length")
                finished.append(seq)
                break
        batch.sampled.append((i, seq, len(seq) - 1))
        if seq.status is not SequenceStatus.FINISHED and \
                seq.num_computed_tokens // bm.block_size > len(bm.seq_hashes[seq.seq_id]):
            scheduler.publish(seq)
    bm.release_windows(batch.seqs)
    return finished
