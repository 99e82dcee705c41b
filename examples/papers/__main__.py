"""``python -m examples.papers [--smoke] [--out FILE] [--figure FILE] [--home DIR]``"""

from examples.papers import cli

cli()
