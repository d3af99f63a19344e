"""Which decode bucket a batch of ``n`` sequences runs in, and how a batch larger than every bucket is split."""
import bisect


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n; the caller splits batches larger than the largest bucket first."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def split_batch(n: int, buckets: tuple[int, ...]) -> list[tuple[int, int]]:
    """Cut ``n`` rows into (start, rows) chunks: full largest buckets, then one padded remainder.

    A graph replay of the largest bucket costs far less than an eager step of the same rows, so batches
    beyond the largest bucket replay it several times rather than falling back to eager.
    """
    largest, chunks, start = buckets[-1], [], 0
    while n - start > largest:
        chunks.append((start, largest))
        start += largest
    chunks.append((start, n - start))
    return chunks
