"""Optional capabilities behind one hook interface, found by folder or entry point.

Modules in this folder are features that belong to no other package (FedProx, server momentum);
features of constrained clients live in `fedllm.constrained`, DP mechanisms and SecAgg+ in
`fedllm.privacy`, HetLoRA's client part beside its aggregator.
"""
