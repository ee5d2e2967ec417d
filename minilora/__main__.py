from minilora.cli import main

raise SystemExit(main())
