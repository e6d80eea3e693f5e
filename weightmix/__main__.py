import sys

from weightmix.cli import main

sys.exit(main())
