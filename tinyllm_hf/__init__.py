"""tinyllm-hf: from raw Chinese text to a released small Chinese chat model on the Hugging Face stack.

Importing the package registers the Tinyllm config and models with transformers' Auto classes without importing
torch: `tinyllm_hf.modeling` (which registers them when it is imported) loads as soon as transformers' Auto mappings
load, or when one of the classes below is first used. So `import tinyllm_hf` then
`AutoModelForCausalLM.from_pretrained(dir)` works, and `tinyllm --help` stays fast.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"
__all__ = ["TinyllmConfig", "TinyllmModel", "TinyllmForCausalLM", "TinyllmForSequenceClassification", "__version__"]

MODEL_CLASSES = ("TinyllmConfig", "TinyllmModel", "TinyllmForCausalLM", "TinyllmForSequenceClassification")
AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
AUTO_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def __getattr__(name: str):  # PEP 562: `from tinyllm_hf import TinyllmForCausalLM` imports torch only then
    if name in MODEL_CLASSES:
        return getattr(importlib.import_module("tinyllm_hf.modeling"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_after_import(module_name: str) -> None:
    # configuration_auto also loads at the top of modeling_auto: registering then would import our models while
    # modeling_auto is half-initialised, so leave it to modeling_auto's own turn.
    if module_name == AUTO_CONFIG_MODULE and AUTO_MODEL_MODULE in sys.modules:
        return
    importlib.import_module("tinyllm_hf.modeling")


class AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    """A post-import hook: when transformers' Auto config or Auto model module has run, import `tinyllm_hf.modeling`
    (which registers our classes). It finds the real module with the path finder and wraps its loader."""

    def __init__(self, module_names):
        self.pending = set(module_names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_after_import(fullname)

        spec.loader.exec_module = exec_then_register
        return spec


if AUTO_CONFIG_MODULE in sys.modules or AUTO_MODEL_MODULE in sys.modules:  # transformers' Auto classes already loaded
    importlib.import_module("tinyllm_hf.modeling")
else:
    sys.meta_path.insert(0, AutoRegistrationFinder((AUTO_CONFIG_MODULE, AUTO_MODEL_MODULE)))
