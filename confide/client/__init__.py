"""Site side of Confide: models, data loaders, training loops and the Flower ClientApps."""
