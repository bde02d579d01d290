"""``python -m moe_tune`` (also what torchrun starts): the same CLI as the console script."""

from moe_tune.cli.app import main

if __name__ == "__main__":
    main()
