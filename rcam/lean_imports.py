"""CompressAI without its package init: rcam uses two of its subpackages, and the init imports them all.

CompressAI 1.2.8's `compressai/__init__.py` imports every subpackage, among them its point-cloud datasets and
transforms, and through those torch_geometric, torch._dynamo, pandas and sympy: 2.3 s and about 270 MB of
every rcam process (command, `--jobs` worker, test), for nothing rcam runs. rcam needs `compressai.entropy_models`
and `compressai.layers`, which import only `compressai.ops`, `compressai._CXX` and the entropy coder.

`install()` puts a stand-in `compressai` package in sys.modules before any of them is imported: the real
package's folder (so every submodule imports as usual), the entropy-coder functions its init defines (the
entropy models call them; the same defaults), and a module `__getattr__` that imports a submodule asked for by
name (`from compressai import ans`, `compressai.zoo`) and runs the real init the first time anything else is
asked of the package (`compressai.__version__`), so the rest of CompressAI still works in the same process.

`compressai.entropy_models` also imports `scipy.stats` (0.47 s of the 1.7 s `rcam --help` took) for one call,
`norm.ppf` in `GaussianConditional.update`, which rcam never makes (its coder has tables of its own). `install()`
puts a stand-in for it in sys.modules that imports it the first time anything in it is used (importlib's
LazyLoader does not do here: `import` itself reads the module's spec, which loads it).
"""

from __future__ import annotations

import importlib.util
import sys
import types

# compressai/__init__.py's own defaults: the "ans" coder (compressai.ans, its C++ extension).
_DEFAULT_CODER = "ans"


def _stand_in(spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    package = types.ModuleType("compressai")
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "compressai"
    package._entropy_coder = _DEFAULT_CODER
    package._available_entropy_coders = [_DEFAULT_CODER]
    completed = False

    def get_entropy_coder() -> str:
        return package._entropy_coder

    def available_entropy_coders() -> list[str]:
        return package._available_entropy_coders

    def __getattr__(name: str):
        nonlocal completed
        if importlib.util.find_spec(f"compressai.{name}") is not None:  # a subpackage: just that (`from compressai import ans`)
            return importlib.import_module(f"compressai.{name}")
        if completed:
            raise AttributeError(f"module 'compressai' has no attribute '{name}'")
        completed = True
        source = spec.loader.get_source("compressai")
        exec(compile(source, spec.origin, "exec"), package.__dict__)  # the real init, into this module
        return getattr(package, name)

    package.get_entropy_coder = get_entropy_coder
    package.available_entropy_coders = available_entropy_coders
    package.__getattr__ = __getattr__
    return package


class _Deferred(types.ModuleType):
    """A module's stand-in with the real one's spec and file (what `import` and inspect.getmodule read), that
    imports the real module the first time anything else is asked of it."""

    def __getattr__(self, attribute: str):
        parent_name, _, child = self.__name__.rpartition(".")
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        setattr(sys.modules[parent_name], child, real)
        return getattr(real, attribute)


def _defer(name: str) -> None:
    """Put a _Deferred stand-in for module `name` (a submodule) in sys.modules, unless imported already or missing."""
    if name in sys.modules:
        return
    parent_name, _, child = name.rpartition(".")
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # its parent package is not installed: the importers will say so
        return
    if spec is None:
        return
    stand_in = _Deferred(name)
    stand_in.__spec__, stand_in.__file__, stand_in.__package__ = spec, spec.origin, name
    if spec.submodule_search_locations is not None:
        stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = stand_in
    setattr(importlib.import_module(parent_name), child, stand_in)


def install() -> None:
    """Stand in for the `compressai` package unless it is imported already or not installed, and make its
    `scipy.stats` import lazy."""
    if "compressai" in sys.modules:
        return
    _defer("scipy.stats")
    spec = importlib.util.find_spec("compressai")
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return  # not installed as a package here: the imports that need it will say so
    sys.modules["compressai"] = _stand_in(spec)
