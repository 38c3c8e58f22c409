"""nsr-megatron: RLVR training with Near-boundary Stochastic Rescue (NSR) on Megatron-Core."""

__version__ = "0.1.0"
