"""Errors a user can cause, each carrying one line that names the file or key and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the user's input, config or files, explained in one line."""


class ConfigError(PipelineError):
    """An unknown key, a value of the wrong type or a missing config file."""


class DatasetError(PipelineError):
    """A dataset folder, map file or split that cannot be used as given."""


class ImageError(PipelineError):
    """One image that cannot be decoded; recorded in the cache, never fatal to a run."""


class CacheError(PipelineError):
    """A cache file that is missing, locked, corrupt or made under another fingerprint."""
