import sys

from turbojax.plan.cli import main
from turbojax.training import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
