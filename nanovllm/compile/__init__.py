"""Graph mode: bucket policy, one compiled step captured per decode bucket, and the compile cache.

Executors: the contract in ``base.py``, one module per executor (``eager.py``, ``graph.py``, ``static_graph.py``) and
the choice among them in ``factory.py``, which imports them all (nothing imports it back).
"""
