"""One file per architecture, plus the registry and the checkpoint loader."""
