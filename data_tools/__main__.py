"""``python -m data_tools`` runs the ``mdt-data`` command line."""

import sys

from .cli import main

sys.exit(main())
