from agent.provision.cli import main

raise SystemExit(main())
