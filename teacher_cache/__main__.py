from teacher_cache.cli import main

raise SystemExit(main())
