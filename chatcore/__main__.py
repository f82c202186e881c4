"""``python -m chatcore`` is the ``chatcore`` command."""

from ._cli import main

raise SystemExit(main())
