"""Graph mode: bucket policy, per-bucket compile + capture, the dynamic prefill graph and the compile cache."""
