"""Constrained clients: pruned bases, rank and precision tiers, the bandit, compression."""
