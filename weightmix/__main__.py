import sys

from weightmix.launch import main

sys.exit(main())
