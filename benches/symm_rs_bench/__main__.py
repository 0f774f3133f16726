"""``PYTHONPATH=benches python -m symm_rs_bench [options]``: ``python -m symm_rs bench`` by
another name, for a shell that is not in the checkout."""

import sys

from symm_rs.cli import main

sys.exit(main(["bench", *sys.argv[1:]], prog="python -m symm_rs_bench"))
