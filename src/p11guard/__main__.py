from p11guard.cli import main

raise SystemExit(main())
