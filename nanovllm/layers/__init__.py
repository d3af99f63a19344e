"""Building blocks of the model graphs: norms, rotary embedding, attention, sampler."""
