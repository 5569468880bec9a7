"""Jobs built on typed configs: build, train and submit from a config file."""
