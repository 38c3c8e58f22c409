"""The trainer: input checks (``preflight``), the run's components (``runtime``), the RL loop (``loop``), the
megatron boundary (``actor``: forward/backward, optimizer), advantages, experience packing and checkpoints.

Submodules are imported where they are used: ``loop``, ``runtime`` and ``actor`` pull in megatron-core.
"""
