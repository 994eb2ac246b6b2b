"""``python -m polydistill`` runs the CLI."""

import sys

from polydistill.cli import main

sys.exit(main())
