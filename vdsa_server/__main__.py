import sys

from vdsa_server.cli import main

sys.exit(main())
