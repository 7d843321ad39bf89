"""The recipe: its typed schema, YAML loading with overrides, and every cross-section check."""

from fedllm.recipe.checks import ConfigError
from fedllm.recipe.load import build_config, load_recipe, parse_overrides
from fedllm.recipe.schema import RunConfig
from fedllm.recipe.schema_model import TierConfig
from fedllm.recipe.yaml_io import dump_yaml, load_yaml

__all__ = [
    "ConfigError",
    "RunConfig",
    "TierConfig",
    "build_config",
    "dump_yaml",
    "load_recipe",
    "load_yaml",
    "parse_overrides",
]
