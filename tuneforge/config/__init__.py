from tuneforge.config.load import apply_override, describe_schema, dump_config, load_config, to_dict, validate
from tuneforge.config.schema import Config

__all__ = ["Config", "apply_override", "describe_schema", "dump_config", "load_config", "to_dict", "validate"]
