"""`python -m trainer_core train CONFIG.yaml`: see cli.py."""

import sys

from .cli import main

sys.exit(main())
