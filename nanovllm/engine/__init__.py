"""Host side of the engine: sequences, paged KV bookkeeping, scheduling and the model runner."""
