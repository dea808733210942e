"""The trainer: phases, embedding cache, optimiser/schedule, checkpoints, tracking."""
