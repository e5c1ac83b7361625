"""Forward, training step and greedy decode: dsmoe vs transformers. Same as `dsmoe bench`.

    OMP_NUM_THREADS=2 python benchmarks/bench.py [--quick] [--json] [--dtype fp32|bf16|both]
                                                 [--seq-len T] [--batch-size B]
"""

import sys

from dsmoe.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
