from symm_rs.cli import main

raise SystemExit(main(prog="python -m symm_rs"))
