"""Test-wide settings."""

import torch

# The suite's tensors are small: one thread avoids oversubscribing shared CI cores,
# where two threads on tiny ops are many times slower than one.
torch.set_num_threads(1)
