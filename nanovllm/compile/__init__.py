"""Graph mode: bucket policy, one compiled step captured per decode bucket, and the compile cache."""
