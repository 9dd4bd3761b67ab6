"""`python -m we_timm.export`: export a train.py checkpoint as a timm / HF hub folder (`we_timm.recipes.export`)."""
from .recipes.errors import exit_process
from .recipes.export import cli

if __name__ == "__main__":
    exit_process(cli())
