"""Federations: Flower apps for `flwr run`, SuperLink/SuperNode commands, TLS, local grids."""
