"""`python -m attnpass.tools.cli`."""
import sys

from attnpass.tools.cli import main

sys.exit(main())
