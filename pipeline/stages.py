"""`from pipeline import extract, train, report, predict, export`: each stage's module is also callable.

`pipeline.train` is a module (its helpers, `run_train` for the command line), and it would
hide a function of the same name in the package. So a stage's module is made callable as the
stage's in-memory core: `train(config)` calls `pipeline.train.train(config)`, while
`pipeline.train.run_train` and monkeypatching `pipeline.predict.X` work as for any module.
"""

from __future__ import annotations

import importlib
import sys
import types


class StageModule(types.ModuleType):
    """A stage's module that calls its core function (`__stage__`, "module:function") when called."""

    def __call__(self, *args, **kwargs):
        return self.core()(*args, **kwargs)

    def core(self):
        module, _, name = self.__dict__["__stage__"].partition(":")
        return getattr(importlib.import_module(module), name)

    def __repr__(self) -> str:
        return f"<stage {self.__name__}: calls {self.__dict__['__stage__'].replace(':', '.')}>"


def callable_module(module_name: str, core: str) -> None:
    """Make the module `module_name` callable as `core` ("pipeline.evaluate:report"), imported when called."""
    module = sys.modules[module_name]
    module.__stage__ = core
    module.__class__ = StageModule
