"""The shipped recipes: this folder installs as `fedllm.recipes` (YAML files only; see
`fedllm recipes`)."""
