"""`python -m llproxy` and the `llproxy` script run the command-line interface."""


def main() -> None:
    # The CLI (click, 1 MB) is imported here, not at the top: a worker started by spawn
    # runs the `llproxy` script again as `__mp_main__`, and then only this module loads.
    from .cli import main as cli

    cli()


if __name__ == "__main__":
    main()
