"""`python -m llmlab ...`: the `llmlab` command, for where the venv's `bin/` is not on the PATH.

>>> import subprocess, sys
>>> subprocess.run([sys.executable, "-m", "llmlab", "--version"], capture_output=True, text=True).stdout  # doctest: +SKIP
'llmlab 0.1.0\n'
"""

import sys

from llmlab.cli import main

sys.exit(main())
