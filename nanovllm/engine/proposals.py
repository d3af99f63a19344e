"""``propose``: the proposals a decode step verifies under speculative decoding (``nanovllm/speculative.py``).

A step verifies only when every sequence in it has all its tokens resolved and none asks for logprobs, penalties,
top-k/top-p or a grammar (those steps run plain, one token each), and some sequence has a proposal.  A proposal
never reaches past the request's ``max_tokens`` or ``max_model_len``, and takes further KV blocks only while free
ones last, in the full pool and a window pool (its limit is cut to the room its blocks have, never preempting
anyone).  The blocks are taken before proposing, since a draft model (``drafter.py``) writes its own KV at those
positions.  The proposer is the n-gram ``SpeculativeConfig`` or a ``Drafter``: anything with
``propose_all(seqs, limits)``.
"""
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence


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
