"""Model directories: the published format, the key mapping and strict check, hub ids through the
hub client's cache, and random-weight checkpoints generated offline."""
