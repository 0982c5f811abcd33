"""``python -m scr_nb`` is the ``scr-nb`` command."""

import sys

from scr_nb.ui.cli import main

sys.exit(main())
