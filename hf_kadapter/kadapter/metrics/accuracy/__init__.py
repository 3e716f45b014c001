"""The `accuracy` evaluate module; a package only so that packaging ships its script (load it with load_metric)."""
