"""Named ZipCache presets (YAML); loaded by ``ZipCacheConfig.load(name)``."""
