"""What every training loop shares: the loop, the recipe book, schedules, optimizers, checkpoints, data parallelism. Knows no model family."""
