"""Collector hooks: attach to a PyTorch MoE model and record its routing into a moeviz store."""
