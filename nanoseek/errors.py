"""The one exception nanoseek raises for bad user input.

The CLI turns it into a single line on stderr and exit code 2; library users catch it like any
ValueError.
"""


class NanoseekError(ValueError):
    """Bad input: a missing path, a config that does not match the weights, a truncated file, ..."""
