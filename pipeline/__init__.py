"""Transfer learning on cached bottleneck features: extract once, train heads in seconds."""

__version__ = "0.1.0"
