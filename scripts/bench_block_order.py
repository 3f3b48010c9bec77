"""The token shards' block order in memory: :class:`~bitnet_train.data.block_order.BlockPermutation`
(a keyed Feistel network, computed per index) at the 2B4T recipe's size against a materialized
``numpy`` permutation (what the shard reader built before, per rank and epoch).

    python scripts/bench_block_order.py

Prints the traced peak memory and the time per index of the Feistel order for the block count of
4 T tokens at seq_len 4096, and numpy's bytes per block for 10 M blocks.
"""

import time, tracemalloc
import numpy as np
from bitnet_train.data.block_order import BlockPermutation
from bench_harness import machine_line
print(machine_line(), flush=True)
n = 4 * 10**12 // 4097  # 2B4T: 4 T tokens, seq_len 4096
tracemalloc.start()
t = time.perf_counter()
p = BlockPermutation(n, seed=0, epoch=0)
vals = [p[k] for k in range(100_000)]
dt = time.perf_counter() - t
print(f"BlockPermutation n={n:,}: peak traced {tracemalloc.get_traced_memory()[1] - 0:,} B incl. the 100k results list; {dt / 1e5 * 1e6:.1f} us/index")
tracemalloc.stop()
tracemalloc.start()
p = BlockPermutation(n, seed=0, epoch=0); x = p[12345]
print(f"  construct + one index: peak {tracemalloc.get_traced_memory()[1]:,} B")
tracemalloc.stop()
m = 10**7
tracemalloc.start()
q = np.random.default_rng([0, 0]).permutation(m)
print(f"numpy permutation n={m:,}: peak {tracemalloc.get_traced_memory()[1]:,} B ({tracemalloc.get_traced_memory()[1] / m:.1f} B/block)")
