"""The recipe schema: one pydantic model per recipe section, every field described, unknown keys refused.

One module per stage section (the section's settings live next to each other, the peft way); this package
re-exports them so `from toolkit.config import X` is the one import path. The same models are used from Python
and from YAML. Importing this package must stay cheap (pydantic + yaml only): `optkit validate` and `--help`
depend on it.
"""

from toolkit.config.base import STAGE_ORDER, Section
from toolkit.config.cache import CacheConfig
from toolkit.config.collect import CollectConfig
from toolkit.config.common import (DataConfig, GenerationConfig, ModelSpec, Price, RuntimeConfig, SplitConfig,
                                   TrackingConfig)
from toolkit.config.distill import (DistillConfig, KDConfig, LauncherConfig, LoraSettings, PruneConfig,
                                    StudentConfig, TrainConfig)
from toolkit.config.evaluate import EvaluateConfig, JudgeConfig, SystemEvalConfig
from toolkit.config.export import ExportConfig
from toolkit.config.loading import apply_overrides, format_validation_error, load_recipe, parse_override, recipe_from_dict
from toolkit.config.quantize import (GGUF_TYPES, AWQConfig, CalibrationConfig, GGUFConfig, GPTQConfig, Int8Config,
                                     QuantizeConfig, QuantMethodConfig)
from toolkit.config.recipe import Recipe, config_hash
from toolkit.config.reference import schema_reference
from toolkit.config.route import RouteConfig, RouteLabelsConfig, RouteTargetConfig

__all__ = [
    "STAGE_ORDER", "Section", "CacheConfig", "CollectConfig",
    "DataConfig", "GenerationConfig", "ModelSpec", "Price", "RuntimeConfig", "SplitConfig",
    "TrackingConfig", "DistillConfig", "KDConfig", "LauncherConfig", "LoraSettings", "PruneConfig", "StudentConfig",
    "TrainConfig", "EvaluateConfig", "JudgeConfig", "SystemEvalConfig", "ExportConfig", "apply_overrides",
    "format_validation_error", "load_recipe", "parse_override", "recipe_from_dict", "GGUF_TYPES", "AWQConfig",
    "CalibrationConfig", "GGUFConfig", "GPTQConfig", "Int8Config", "QuantizeConfig", "QuantMethodConfig", "Recipe",
    "config_hash", "schema_reference", "RouteConfig", "RouteLabelsConfig", "RouteTargetConfig",
]
