"""The mechanism on ``torch.optim``: the global step hooks, per-optimizer state, plans, step sizes,
applying the maps, sparsity targets, and the penalty for the loss."""
