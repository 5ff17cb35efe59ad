"""What the user writes, checked and resolved: the run spec (YAML + --set) and the DeepSpeed
JSON (engine settings). Nothing here starts a process group or writes a file."""

from launcher.config.ds_config import EngineSettings, resolve_engine
from launcher.config.load import SpecError, load_spec, spec_from_dict, spec_to_dict
from launcher.config.spec import RunSpec

__all__ = [
    "EngineSettings",
    "RunSpec",
    "SpecError",
    "load_spec",
    "resolve_engine",
    "spec_from_dict",
    "spec_to_dict",
]
