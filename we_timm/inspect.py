"""`python -m we_timm.inspect CHECKPOINT --output-dir DIR`: dry-run WE on a checkpoint (`we_timm.recipes.inspect`)."""
from .recipes.errors import exit_process
from .recipes.inspect import cli

if __name__ == "__main__":
    exit_process(cli())
