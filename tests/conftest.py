import sys
from pathlib import Path

import torch

# Tests import their helpers (hf_models, reference_v1) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
