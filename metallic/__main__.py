import sys

from metallic.cli import main

sys.exit(main())
