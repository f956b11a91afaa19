from cueline_server.cli import main

raise SystemExit(main())
