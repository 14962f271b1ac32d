from tuneforge.config.load import apply_override, describe_schema, dump_config, load_config, to_dict
from tuneforge.config.rules import check_recipe
from tuneforge.config.schema import Config

__all__ = ["Config", "apply_override", "check_recipe", "describe_schema", "dump_config", "load_config", "to_dict"]
