import sys

from moeprune.cli import main

sys.exit(main())
