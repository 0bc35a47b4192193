"""``python -m curvlab ablate``: the same as the ``curvlab`` console script."""

from curvlab.ablation.cli import main

raise SystemExit(main())
