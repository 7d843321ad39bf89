"""The server side: the round loop, the strategy, checkpoints, metrics, evaluation and outputs."""
