"""One module per ``reshuffle`` subcommand, each with ``add_parser(subparsers)`` and ``run(args)``."""
