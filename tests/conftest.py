import os
import sys
from pathlib import Path

# One intra-op thread for the tests and every subprocess they start: the models here are tiny, and on a
# shared 2-core machine a second OpenMP thread that gets descheduled makes every op spin-wait (100x
# slower steps were measured with a busy neighbour).
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
# Tests import their helpers (hf_models, reference_v1) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
