"""``python -m curvlab ablate``: the same as the ``curvlab`` console script."""

from curvlab.cli import main

raise SystemExit(main())
