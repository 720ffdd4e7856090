"""``python -m data_prep <command> ...``: see :mod:`data_prep.cli`."""
import sys

from data_prep.cli import main

sys.exit(main())
