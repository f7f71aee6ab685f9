"""Search strategies over the same Explorer: one module each.

- :mod:`axcnn.search.greedy`: the paper's Algorithms 1 and 2 (the default mode);
- :mod:`axcnn.search.budget`: ``--max-loss`` / ``--target-cr``: a per-layer sensitivity table, an allocation of
  bits by dynamic programming, and verification on held-out samples.
"""
