"""`python -m nanoseek.serve --model DIR [...]`: the same as `nanoseek serve`."""
import sys

from .cli import main

sys.exit(main())
