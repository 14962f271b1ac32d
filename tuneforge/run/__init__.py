"""A run directory (layer 9): planning and committing it for training (`dir`), loading a finished run (`load`),
merging its adapter into the base weights (`merge`). Import from the modules themselves."""
