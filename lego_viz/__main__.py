from lego_viz.cli import main

raise SystemExit(main())
