"""`python -m longembed.plugin.cli`: the `longembed` command."""

import sys

from longembed.plugin.cli import main

sys.exit(main())
