from symm_rs.cli import main

raise SystemExit(main())
