"""Optional capabilities behind one hook interface, found by folder or entry point.

Modules in this folder are features that belong to no other package (FedProx, server momentum);
features of constrained clients live in `fedllm.constrained`, DP mechanisms and SecAgg+ in
`fedllm.privacy`. The client parts of aggregators that have one live here too
(`hetlora_prune`, `sdflora_local`, `fedplora_fold`, `prelort_nested`, `squeeze_intune`).
"""
