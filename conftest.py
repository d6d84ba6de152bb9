"""Nothing to wire: the qiotests plugin (``harness/plugin.py``) is the ``pytest11`` entry
point of this package, loaded by any pytest run in the venv."""
