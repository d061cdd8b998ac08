"""`python -m client ...`: the same as the `sd-txt2img` console script."""

from client.cli import main

raise SystemExit(main())
