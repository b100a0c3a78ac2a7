from jaxrec.cli import main

raise SystemExit(main())
