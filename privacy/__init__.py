"""Differential privacy for fedllm: DP-SGD on clients, client-level DP, ε accounting."""

from .accounting import PrivacyLedger, epsilon, noise_multiplier_for

__all__ = ["PrivacyLedger", "epsilon", "noise_multiplier_for"]
