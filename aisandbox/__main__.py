"""`python -m aisandbox`."""

from aisandbox.cli import main

raise SystemExit(main())
