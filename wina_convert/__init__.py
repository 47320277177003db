"""wina-convert: WINA-ready sparse checkpoints for Hugging Face causal language models.

``convert`` writes a checkpoint, ``load`` runs one sparse, ``evaluate`` measures it and ``push``
uploads it; each CLI command of ``wina`` is one of these functions.
"""

__version__ = "0.1.0"

from .errors import WinaError  # noqa: E402
from .convert import convert  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["WinaError", "__version__", "convert", "load", "evaluate", "push"]


def __getattr__(name: str):
    if name == "evaluate":
        from .perplexity import evaluate

        return evaluate
    if name == "push":
        from .hub import push

        return push
    raise AttributeError(name)
