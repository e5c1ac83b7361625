"""Training: corpus and batches, balance losses and the routing-bias update, the loop, checkpoints, metrics."""
