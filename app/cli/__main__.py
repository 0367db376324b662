"""``python -m app.cli`` (what ``segapp train --nproc N`` runs under torchrun)."""

import sys

from app.cli.main import main

sys.exit(main())
