"""`python -m llproxy` runs the command-line interface."""

from .cli import main

main()
