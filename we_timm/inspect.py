"""`python -m we_timm.inspect CHECKPOINT --output-dir DIR`: dry-run WE on a checkpoint (`we_timm.recipes.inspect`)."""
import sys

from .recipes.inspect import cli

if __name__ == "__main__":
    sys.exit(cli())
