import sys

from asu_simu_plugin.cli import main

sys.exit(main())
