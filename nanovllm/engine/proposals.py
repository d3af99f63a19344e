"""``propose``: the proposals a decode step verifies under speculative decoding (``nanovllm/speculative.py``).

A step verifies only when every sequence in it has all its tokens resolved and none asks for logprobs, penalties,
top-k/top-p or a grammar (those steps run plain, one token each), and some sequence has a proposal.  A proposal
never reaches past the request's ``max_tokens`` or ``max_model_len``, and takes further KV blocks only while free
ones last (it is cut to the room its blocks have, never preempting anyone).
"""
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence
from nanovllm.speculative import SpeculativeConfig


def propose(seqs: list[Sequence], speculative: SpeculativeConfig | None, block_manager: BlockManager,
            max_model_len: int) -> list[list[int]] | None:
    """Per sequence of a decode step, its proposal (blocks appended for it), or None: a plain step."""
    if speculative is None or any(
            s.token_ids[-1] == PENDING_TOKEN or s.logprobs is not None or s.grammar is not None
            or s.params.needs_processing or s.params.needs_filter for s in seqs):
        return None
    bm, proposals = block_manager, []
    for seq in seqs:
        room = min(seq.params.max_tokens - (len(seq) - seq.num_prompt_tokens), max_model_len - len(seq)) - 1
        proposal = speculative.propose(seq.token_ids, room)
        while proposal and len(seq.block_table) * bm.block_size < len(seq) + len(proposal):
            if bm.num_free_blocks == 0:
                proposal = proposal[:len(seq.block_table) * bm.block_size - len(seq)]
                break
            bm.append_block(seq)
        proposals.append(proposal)
    return proposals if any(proposals) else None
