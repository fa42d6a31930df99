import sys

from weightport.cli import main

sys.exit(main())
