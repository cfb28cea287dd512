"""`python -m mmbert COMMAND ...`: the same as the installed `mmbert` command."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .cli import main  # noqa: E402

if __name__ == "__main__":
    main()
