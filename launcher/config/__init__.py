"""What the user writes, checked and resolved: the run spec (spec.py, load.py: YAML + --set) and
the DeepSpeed JSON (ds_config.py: EngineSettings, checked by ds_schema.py). Nothing here starts a
process group or writes a file. Import the modules themselves: this package stays light, so
`--help` and argument errors answer without loading torch."""
