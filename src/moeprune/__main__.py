import sys

from moeprune.cli import run

sys.exit(run())
