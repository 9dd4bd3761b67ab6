"""`python -m we_timm.export`: export a train.py checkpoint as a timm / HF hub folder (`we_timm.recipes.export`)."""
import sys

from .recipes.export import cli

if __name__ == "__main__":
    sys.exit(cli())
