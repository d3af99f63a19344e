"""The graph sizes an engine captures, checked: decode buckets (``normalize_graph_batch_sizes``, the defaults
``DEFAULT_GRAPH_BATCH_SIZES`` capped at the rows a decode step holds) and prefill token counts
(``normalize_prefill_graph_sizes``); a bad size is a ``ValueError`` naming it.  ``EngineConfig`` applies them.
"""
DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def normalize_graph_batch_sizes(sizes, max_num_seqs: int, rows_per_sequence: int = 1) -> tuple[int, ...]:
    """Validate, deduplicate and sort decode buckets; ``None`` gives the defaults capped at the rows a decode step
    holds: ``max_num_seqs``, times ``rows_per_sequence`` (1 + k when speculating: a verify step's rows)."""
    rows = max_num_seqs * rows_per_sequence
    if sizes is None:
        capped = [s for s in DEFAULT_GRAPH_BATCH_SIZES if s <= rows]
        if rows not in capped and rows < DEFAULT_GRAPH_BATCH_SIZES[-1]:
            capped.append(rows)
        return tuple(sorted(set(capped)))
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"graph_batch_sizes must be a list of positive ints, got {sizes!r}")
    sizes = list(sizes)
    if not sizes:
        raise ValueError("graph_batch_sizes must not be empty (use enforce_eager=True to disable graphs)")
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"graph_batch_sizes must hold positive ints, got {s!r} in {sizes}")
        if s > rows:
            held = f" x (1 + num_speculative_tokens) = {rows} rows" if rows_per_sequence > 1 else ""
            raise ValueError(f"graph batch size {s} exceeds max_num_seqs={max_num_seqs}{held}; "
                             f"raise max_num_seqs or drop the bucket")
    return tuple(sorted(set(sizes)))


def normalize_prefill_graph_sizes(sizes, max_num_seqs: int, max_step_tokens: int) -> tuple[int, ...] | None:
    """Validate, deduplicate and sort the token counts prefill steps are captured at; ``None`` stays ``None``
    (the platform's default, see ``compile/prefill_graphs.py``) and an empty list turns prefill graphs off.

    A prefill graph has ``max_num_seqs + 1`` sequence rows and must hold more tokens than rows (a step with one
    token per row is a decode step), and no step holds more than ``max_step_tokens`` tokens."""
    if sizes is None:
        return None
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"prefill_graph_sizes must be a list of token counts, got {sizes!r}")
    sizes = list(sizes)
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or not max_num_seqs + 1 < s <= max_step_tokens:
            raise ValueError(f"prefill graph sizes must be ints in (max_num_seqs + 1, the most tokens a step holds] "
                             f"= ({max_num_seqs + 1}, {max_step_tokens}], got {s!r} in {sizes}")
    return tuple(sorted(set(sizes)))
