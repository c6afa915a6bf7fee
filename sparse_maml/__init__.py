"""Sparse-MAML and its MAML-family baselines on current PyTorch (torch.func)."""
