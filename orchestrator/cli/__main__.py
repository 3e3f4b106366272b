"""``python -m orchestrator.cli``: the ``shoal`` command, as Ray job entrypoints run it."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
