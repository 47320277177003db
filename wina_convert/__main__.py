"""``python -m wina_convert`` is the ``wina`` command."""

from .cli import run

run()
